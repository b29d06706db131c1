"""studies.stats: intervals against scipy, corrections against scipy and hand computation, regime verdicts on
planted and null effects, merging identical rows, smoke-run exclusion, and the mechanism decomposition."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from studies.stats import (
    QUICK_TAG,
    RegimeInput,
    adjust_p_values,
    adjusted_levels,
    benjamini_hochberg,
    bonferroni,
    bootstrap_interval,
    classify_regimes,
    compare_to_floor,
    error_decomposition,
    evidence_rows,
    floor_distribution,
    holm,
    is_quick,
    merge_identical_rows,
    paired_bootstrap,
    paired_difference,
    split_quick,
    verdict_from_directions,
)

RNG_KW = "rng" if "rng" in __import__("inspect").signature(sps.bootstrap).parameters else "random_state"


# ------------------------------------------------------------------ paired t-intervals
@pytest.mark.parametrize("n,level", [(3, 0.95), (6, 0.95), (10, 0.99)])
def test_paired_difference_matches_scipy(n, level):
    rng = np.random.default_rng(n)
    a, b = rng.normal(1.0, 1.0, n), rng.normal(0.5, 1.0, n)
    pd = paired_difference(a, b, level=level)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(level)
    assert pd.t == pytest.approx(ref.statistic, rel=1e-12)
    assert pd.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert (pd.low, pd.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    d = a - b  # the interval by hand from t.ppf
    half = sps.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    assert (pd.low, pd.high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)
    assert pd.n == n and pd.df == n - 1 and pd.degenerate == ""
    one = paired_difference(d, level=level)  # one-sample form
    ref1 = sps.ttest_1samp(d, 0.0)
    assert one.p_value == pytest.approx(ref1.pvalue, rel=1e-10)
    assert (one.low, one.high) == pytest.approx(tuple(ref1.confidence_interval(level)), rel=1e-10)


def test_paired_difference_degenerate_cases():
    single = paired_difference([2.0], [1.0])
    assert single.degenerate == "single seed" and single.p_value == 1.0 and single.direction == 0
    assert single.low == -math.inf and single.high == math.inf and math.isnan(single.sd)
    const = paired_difference([3.0, 3.0, 3.0], [1.0, 1.0, 1.0])
    assert const.degenerate == "zero variance" and const.p_value == 0.0 and (const.low, const.high) == (2.0, 2.0)
    assert const.direction == 1 and const.t == math.inf
    zero = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert zero.p_value == 1.0 and zero.direction == 0 and (zero.low, zero.high) == (0.0, 0.0)
    assert paired_difference(torch.tensor([1.0, 2.0, 4.0])).mean == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        paired_difference([1.0, 2.0], level=95)


# ------------------------------------------------------------------ bootstrap
@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_bootstrap_matches_scipy_and_normal_theory(method):
    x = np.random.default_rng(1).exponential(1.0, 800)
    got = bootstrap_interval(x, n_resamples=1000, seed=3, method=method)
    ref = sps.bootstrap((x,), np.mean, n_resamples=1000, method=method, vectorized=True,
                        **{RNG_KW: np.random.default_rng(3)})
    assert (got.low, got.high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    assert got.standard_error == pytest.approx(ref.standard_error, rel=1e-12)
    assert got.estimate == pytest.approx(x.mean(), rel=1e-15)
    se = x.std(ddof=1) / math.sqrt(x.size)  # large n: close to mean -/+ 1.96 se
    assert got.standard_error == pytest.approx(se, rel=0.1)
    assert got.high - got.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_interval(x, n_resamples=1000, seed=3, method=method) == got  # seeded


def test_paired_bootstrap_keeps_the_pairing():
    """Two methods on the same samples share most of their per-sample variation; the paired interval of
    the mean difference matches scipy's paired bootstrap, equals the bootstrap of the differences, and
    is much narrower than the spread of either method."""
    rng = np.random.default_rng(2)
    common = rng.normal(0, 1, 1000)
    a, b = common + 0.05 + rng.normal(0, 0.1, 1000), common + rng.normal(0, 0.1, 1000)
    got = paired_bootstrap(a, b, n_resamples=1000, seed=4)
    ref = sps.bootstrap((a, b), lambda u, v, axis=-1: u.mean(axis) - v.mean(axis), paired=True, vectorized=True,
                        n_resamples=1000, method="percentile", **{RNG_KW: np.random.default_rng(4)})
    assert (got.low, got.high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    diffs = bootstrap_interval(a - b, n_resamples=1000, seed=4)
    assert (got.low, got.high) == pytest.approx((diffs.low, diffs.high), rel=1e-9)
    assert got.direction == 1 and got.high - got.low < 0.03
    assert bootstrap_interval(a, n_resamples=1000).high - bootstrap_interval(a, n_resamples=1000).low > 0.1
    const = bootstrap_interval(np.full(10, 2.5))
    assert (const.low, const.estimate, const.high) == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError, match="method"):
        bootstrap_interval(a, method="bca")


# ------------------------------------------------------------------ floors
def test_floor_distribution_and_comparison():
    def draw(seed):
        g = np.random.default_rng(seed)
        return {"w2": float(np.abs(g.normal(0.1, 0.01))), "mmd2": float(g.normal(0.0, 1e-4))}

    floor = floor_distribution(draw, num_draws=12, seed=5)
    assert set(floor) == {"w2", "mmd2"}
    w2 = floor["w2"]
    assert w2.n == 12 and len(set(w2.seeds)) == 12
    assert all(abs(s - t) > 2 for s in w2.seeds for t in w2.seeds if s != t)  # no overlapping seed ranges
    assert w2.mean == pytest.approx(np.mean(w2.values), rel=1e-15)
    assert w2.sd == pytest.approx(np.std(w2.values, ddof=1), rel=1e-12)
    assert floor_distribution(draw, num_draws=12, seed=5)["w2"] == w2
    assert floor_distribution(lambda s: draw(s)["w2"], num_draws=12, seed=5) == w2
    with pytest.raises(ValueError, match="num_draws"):
        floor_distribution(draw, num_draws=3)
    above = compare_to_floor([0.2, 0.21, 0.19], w2)
    ref = sps.ttest_ind([0.2, 0.21, 0.19], w2.values, equal_var=False)
    assert above.p_value == pytest.approx(ref.pvalue, rel=1e-10) and above.direction == 1
    assert (above.low, above.high) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-10)
    assert compare_to_floor(w2.values[:5], w2).direction == 0


def test_floor_distribution_of_a_real_metric():
    from toys.gmm import make_preset
    from toys.metrics import finite_sample_floor

    gmm = make_preset("ring8", dtype=torch.float64)
    floor = floor_distribution(lambda s: finite_sample_floor(gmm, 100, seed=s, max_points=100, num_projections=8))
    assert floor["w2"].n == 10 and floor["w2"].sd > 0 and 0.05 < floor["w2"].mean < 0.6
    assert floor["modes_covered"].mean == 1.0


# ------------------------------------------------------------------ corrections
def test_holm_on_a_hand_computed_example():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.5]).tolist() == [1.0, 1.0]
    assert bonferroni([0.01, 0.3]).tolist() == pytest.approx([0.02, 0.6])


@pytest.mark.parametrize("m", [1, 4, 17, 100])
def test_benjamini_hochberg_matches_scipy(m):
    p = np.random.default_rng(m).uniform(0, 0.2, m) ** 2
    p[: m // 3] = p[0]  # ties
    assert benjamini_hochberg(p) == pytest.approx(sps.false_discovery_control(p, method="bh"), rel=1e-12)
    assert adjust_p_values(p, "bh") == pytest.approx(benjamini_hochberg(p))
    assert adjust_p_values(p, "none").tolist() == p.tolist()
    with pytest.raises(ValueError, match="method"):
        adjust_p_values(p, "fdr")


@pytest.mark.parametrize("method", ["holm", "bh", "bonferroni", "none"])
def test_adjusted_levels_agree_with_adjusted_p_values(method):
    """An interval at level 1 - a_i excludes 0 iff p_i < a_i; that must be the correction's decision."""
    alpha = 0.05
    for seed in range(30):
        p = np.random.default_rng(seed).uniform(0, 0.06, 8) ** 1.5
        by_level = p < 1.0 - adjusted_levels(p, alpha, method)
        by_p = adjust_p_values(p, method) <= alpha
        assert by_level.tolist() == by_p.tolist(), (seed, p)


# ------------------------------------------------------------------ verdicts
def _with_p(p: float, n: int = 5, sign: float = 1.0, scale: float = 1.0) -> list[float]:
    """n values whose one-sample two-sided t-test has p-value p (fixed shape, sd = scale)."""
    z = np.linspace(-1.0, 1.0, n)
    z = z / z.std(ddof=1)
    t = sps.t.isf(p / 2, n - 1)
    return (scale * (z + sign * t / math.sqrt(n))).tolist()


def test_planted_paradox_is_declared():
    rng = np.random.default_rng(0)
    res = classify_regimes([RegimeInput("planted", rng.normal(1, 0.1, 5), rng.normal(1, 0.1, 5), quality_key="w2")])
    (v,) = res.regimes
    assert v.verdict == "paradox" and v.paradox and res.paradoxes == [v]
    assert v.dE.low > 0 and v.dQ.low > 0 and v.p_paradox < 1e-4
    assert (res.method, res.num_comparisons, res.alpha) == ("holm", 1, 0.05)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["correction"] == {"method": "holm", "alpha": 0.05, "num_comparisons": 1}
    assert d["regimes"][0]["verdict"] == "paradox" and d["regimes"][0]["quality_key"] == "w2"


def test_null_quality_difference_is_rarely_a_paradox(capsys):
    """dE has an effect, dQ ~ N(0, 1): a false paradox needs a false quality rejection in the positive
    direction, expected alpha / 2 = 2.5% (5 of 200)."""
    rng = np.random.default_rng(2024)
    count = sum(classify_regimes([RegimeInput("null", rng.normal(1, 0.1, 5), rng.normal(0, 1, 5))]).regimes[0].paradox
                for _ in range(200))
    with capsys.disabled():
        print(f"\n[null regime] false paradoxes: {count} / 200 (expected ~5)")
    assert count <= 20
    # five null regimes per study, Holm across them: a study with any false paradox is just as rare
    studies = sum(bool(classify_regimes([RegimeInput(f"r{i}", rng.normal(1, 0.1, 5), rng.normal(0, 1, 5))
                                         for i in range(5)]).paradoxes) for _ in range(200))
    assert studies <= 20


def test_correction_changes_a_verdict():
    """One regime with p_E = p_Q = 0.02 among three ties: a paradox uncorrected, not after Holm (0.02 > 0.05 / 4)."""
    regimes = [RegimeInput("edge", _with_p(0.02), _with_p(0.02))] + [
        RegimeInput(f"tie{i}", _with_p(0.6), _with_p(0.7, sign=-1)) for i in range(3)]
    raw = classify_regimes(regimes, method="none").by_label()
    holm_ = classify_regimes(regimes, method="holm").by_label()
    assert raw["edge"].verdict == "paradox" and raw["edge"].level == pytest.approx(0.95)
    assert raw["edge"].p_paradox == pytest.approx(0.02, rel=1e-9)
    edge = holm_["edge"]
    assert edge.verdict != "paradox" and edge.level == pytest.approx(1 - 0.05 / 4)
    assert edge.p_paradox_adjusted == pytest.approx(0.08, rel=1e-9)
    assert edge.dE.low < 0 < edge.dE.high  # the interval at the corrected level contains 0
    assert all(holm_[f"tie{i}"].verdict == "tie" for i in range(3))


def test_holm_step_down_and_bh_intervals_match_their_decisions():
    """m = 2 with p = 0.001 and 0.03: Holm rejects both (0.03 < 0.05 / 1 at step 2), Bonferroni only the first
    (0.03 > 0.025). m = 3 with 0.01, 0.03, 0.04: BH rejects all three (0.04 <= 3 * 0.05 / 3)."""
    two = [RegimeInput("a", _with_p(0.001), _with_p(0.001)), RegimeInput("b", _with_p(0.03), _with_p(0.03))]
    h = classify_regimes(two, method="holm").by_label()
    b = classify_regimes(two, method="bonferroni").by_label()
    assert h["a"].paradox and h["b"].paradox and h["b"].level == pytest.approx(0.95)
    assert h["a"].level == pytest.approx(0.975) and h["b"].dQ.low > 0
    assert b["a"].paradox and not b["b"].paradox and b["b"].level == pytest.approx(0.975)
    three = [RegimeInput(k, _with_p(p), _with_p(p)) for k, p in (("x", 0.01), ("y", 0.03), ("z", 0.04))]
    bh = classify_regimes(three, method="bh")
    assert [r.verdict for r in bh.regimes] == ["paradox"] * 3 and bh.regimes[0].level == pytest.approx(0.95)
    hh = classify_regimes(three, method="holm")
    assert [r.verdict for r in hh.regimes] == ["paradox", "tie", "tie"]  # 0.03 > 0.05 / 2: Holm stops at step 2
    assert [r.level for r in hh.regimes] == pytest.approx([1 - 0.05 / 3, 0.975, 0.975])


def test_verdict_labels():
    table = {(1, 1): "paradox", (0, 0): "tie", (-1, -1): "mixed",
             (1, 0): "Direct CD better", (0, -1): "Direct CD better", (1, -1): "Direct CD better",
             (-1, 0): "CD better", (0, 1): "CD better", (-1, 1): "CD better"}
    for (e, q), want in table.items():
        assert verdict_from_directions(e, q) == want
    strong, weak = _with_p(1e-4), _with_p(0.5)
    neg = [-v for v in strong]
    res = classify_regimes([RegimeInput("dcd", strong, neg), RegimeInput("cd", neg, strong),
                            RegimeInput("mix", neg, neg), RegimeInput("only_q", weak, strong)]).by_label()
    assert res["dcd"].verdict == "Direct CD better" and res["dcd"].q_direction == "Direct CD better samples"
    assert res["cd"].verdict == "CD better" and res["cd"].e_direction == "CD lower E"
    assert res["mix"].verdict == "mixed"
    assert res["only_q"].verdict == "CD better" and res["only_q"].e_direction == "tie"
    assert not any(r.paradox for r in res.values())
    single = classify_regimes([RegimeInput("one seed", [5.0], [5.0])]).regimes[0]
    assert single.verdict == "tie" and single.p_paradox == 1.0


def test_regime_input_from_methods():
    r = RegimeInput.from_methods("x", E_cd=[2.0, 3.0], E_dcd=[1.0, 1.5], Q_cd=[0.1, 0.2], Q_dcd=[0.3, 0.5])
    assert r.dE == [1.0, 1.5] and r.dQ == pytest.approx([0.2, 0.3])
    hi = RegimeInput.from_methods("x", [2.0, 3.0], [1.0, 1.5], [0.9, 0.8], [0.5, 0.6], higher_is_better=True)
    assert hi.dQ == pytest.approx([0.4, 0.2])  # > 0: CD has the better (higher) precision
    with pytest.raises(ValueError, match="same seeds"):
        RegimeInput.from_methods("x", [1.0, 2.0], [1.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="method"):
        classify_regimes([r], method="fdr")


# ------------------------------------------------------------------ merging identical rows
def _rows():
    rows = []
    for solver, bump in (("ddim", 0.0), ("euler", 3e-7), ("heun", 0.1), ("ddim_copy", 1e-14)):
        for n in (10, 50):
            rows.append({"solver": solver, "N": n, "label": f"{solver} N={n}",
                         "E": {"mean": 0.5 + n + bump, "values": [0.4 + n + bump, 0.6 + n + bump]}, "w2": 0.1 * n})
    return rows


def test_merge_declared_equivalent_rows():
    res = merge_identical_rows(_rows(), name_key="solver", match_keys=("N",), equivalent={"euler": "ddim"})
    names = [(r["solver"], r["N"]) for r in res.rows]
    assert names == [("ddim", 10), ("ddim", 50), ("heun", 10), ("heun", 50)]  # ddim_copy merged numerically
    assert res.rows[0]["merged_from"] == ["euler", "ddim_copy"]
    declared = [m for m in res.merged if m.reason == "declared"]
    assert [(m.kept, m.dropped, m.match["N"]) for m in declared] == [("ddim", "euler", 10), ("ddim", "euler", 50)]
    assert declared[0].max_abs_diff == pytest.approx(3e-7, rel=1e-6)  # recorded, merged anyway
    numerical = [m for m in res.merged if m.reason == "numerical"]
    assert [m.dropped for m in numerical] == ["ddim_copy", "ddim_copy"] and numerical[0].max_rel_diff < 1e-12
    assert json.loads(json.dumps(res.to_dict()))["merged"][0]["reason"] == "declared"


def test_merge_numerical_tolerance_and_order():
    rows = _rows()
    plain = merge_identical_rows(rows, name_key="solver", match_keys=("N",))
    assert [r["solver"] for r in plain.rows] == ["ddim", "ddim", "euler", "euler", "heun", "heun"]  # 3e-7 apart
    loose = merge_identical_rows(rows, name_key="solver", match_keys=("N",), rtol=1e-5)
    assert [r["solver"] for r in loose.rows] == ["ddim", "ddim", "heun", "heun"]
    # the declared target may come later in the input; rows differing in a match key never merge
    rows = [r for r in rows if r["solver"] != "ddim_copy"]
    rev = merge_identical_rows(rows[::-1], name_key="solver", match_keys=("N",), equivalent={"euler": "ddim"},
                               record_key=None)
    assert sorted((r["solver"], r["N"]) for r in rev.rows) == [("ddim", 10), ("ddim", 50), ("heun", 10),
                                                              ("heun", 50)]
    assert "merged_from" not in rev.rows[0]
    assert len(merge_identical_rows([{"label": "a", "x": 1.0}, {"label": "b", "x": 1.0, "y": 2.0}]).rows) == 2
    nan_rows = [{"label": "a", "x": [1.0, float("nan")]}, {"label": "b", "x": [1.0, float("nan")]}]
    assert len(merge_identical_rows(nan_rows).rows) == 1
    with pytest.raises(ValueError, match="cycle"):
        merge_identical_rows(rows, name_key="solver", equivalent={"euler": "ddim", "ddim": "euler"})
    with pytest.raises(KeyError, match="grid_size"):
        merge_identical_rows(rows, name_key="solver", match_keys=("grid_size",))


# ------------------------------------------------------------------ smoke runs
def test_quick_results_are_not_evidence():
    rows = [{"label": "full", "w2": 0.1}, {"label": "smoke", "w2": 0.2, "quick": True}, {"label": "x", "quick": False}]
    assert [is_quick(r) for r in rows] == [False, True, False]
    evidence, quick = split_quick(rows)
    assert [r["label"] for r in evidence] == ["full", "x"] and [r["label"] for r in quick] == ["smoke"]
    assert [r["label"] for r in evidence_rows(rows)] == ["full", "x"]
    tagged = evidence_rows(rows, include_quick=True)
    assert tagged[1]["label"] == "smoke" + QUICK_TAG and tagged[1]["evidence"] is False
    assert rows[1]["label"] == "smoke"  # input untouched
    rng = np.random.default_rng(0)
    regimes = [RegimeInput(label, rng.normal(1, 0.1, 5), rng.normal(1, 0.1, 5), quick=quick)
               for label, quick in (("full", False), ("smoke", True))]
    res = classify_regimes(regimes)
    assert [r.label for r in res.regimes] == ["full"] and res.excluded_quick == ["smoke"] and res.num_comparisons == 1
    both = classify_regimes(regimes, include_quick=True)
    assert both.num_comparisons == 2 and both.by_label()["smoke"].quick and both.excluded_quick == []


# ------------------------------------------------------------------ mechanism decomposition
def test_error_decomposition_exact_case():
    """b = -0.5 a: the student undoes half the teacher's error: rho = cos = -1, beta = 0.5, total = |a|^2 / 4."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(200, 3, 4, 4, generator=g, dtype=torch.float64)  # image-shaped: flattened per sample
    a = torch.randn(200, 3, 4, 4, generator=g, dtype=torch.float64)
    teacher = true + a
    student = teacher - 0.5 * a
    dec = error_decomposition(student, teacher, true, n_resamples=200)
    aa = float(a.pow(2).flatten(1).sum(1).mean())
    assert dec.correlation.estimate == pytest.approx(-1.0, abs=1e-12)
    assert dec.mean_cosine.estimate == pytest.approx(-1.0, abs=1e-12)
    assert dec.correction.estimate == pytest.approx(0.5, rel=1e-12)
    assert dec.total_error_sq == pytest.approx(0.25 * aa, rel=1e-12)
    assert dec.total_error_sq == pytest.approx(dec.teacher_error_sq + dec.student_error_sq + dec.cross, rel=1e-12)
    with pytest.raises(ValueError, match="zero"):
        error_decomposition(teacher, teacher, true)
    with pytest.raises(ValueError, match="same shape"):
        error_decomposition(student[:5], teacher, true)


def test_error_decomposition_known_correlation():
    """a ~ N(0, I_d), b = c a + s xi: rho = c / sqrt(c^2 + s^2) = -0.6, beta = -c = 0.6; in d = 64 the
    per-sample cosine concentrates near rho as well."""
    rng = np.random.default_rng(7)
    n, d, c, s = 3000, 64, -0.6, 0.8
    a = rng.normal(size=(n, d))
    b = c * a + s * rng.normal(size=(n, d))
    true = rng.normal(size=(n, d))
    dec = error_decomposition(true + a + b, true + a, true, n_resamples=500, seed=1)
    rho = c / math.sqrt(c * c + s * s)
    for interval, want in ((dec.correlation, rho), (dec.correction, -c)):
        assert interval.estimate == pytest.approx(want, abs=4 * interval.standard_error)
        assert interval.low < want < interval.high and interval.high - interval.low < 0.05
    assert dec.mean_cosine.estimate == pytest.approx(rho, abs=0.02) and dec.mean_cosine.direction == -1
    assert dec.to_dict()["correlation"]["n_resamples"] == 500
