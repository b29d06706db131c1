"""studies.evidence / studies.plotting / studies.curves: merged rows, verdicts, convergence flags, labels, figures."""
from __future__ import annotations

import pytest

from studies import evidence, plotting
from studies.curves import CurveConfig, CurveRecorder, check_curve_budget


def _regime(label, solver, e_cd, e_dcd, q_cd, q_dcd, **params):
    return evidence.regime_entry(label, "solver", {"solver": solver, **params},
                                 {"cd": {"E": e_cd, "w2": q_cd}, "direct_cd": {"E": e_dcd, "w2": q_dcd}})


def test_declared_equivalent_solvers_are_merged_and_named_together():
    assert evidence.solver_equivalences().get("euler") == "ddim"  # from odecm.solvers' registry
    rows = [_regime("ddim N=10", "ddim", [1.0, 1.1], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3], N=10),
            _regime("euler N=10", "euler", [1.0 + 1e-7, 1.1], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3], N=10),
            _regime("heun N=10", "heun", [0.9, 1.0], [0.4, 0.5], [0.2, 0.3], [0.25, 0.3], N=10),
            _regime("euler N=20", "euler", [2.0, 2.1], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3], N=20)]
    kept, merged = evidence.merge_regimes(rows, "solver", ("N",))
    assert [r["label"] for r in kept] == ["ddim=euler N=10", "heun N=10", "euler N=20"]  # no ddim at N=20: kept
    assert kept[0]["params"]["solver"] == "ddim=euler" and kept[0]["merged_from"] == ["euler"]
    (rec,) = merged
    assert rec["reason"] == "declared" and rec["kept"] == "ddim" and rec["dropped"] == "euler"
    assert rec["max_abs_diff"] == pytest.approx(1e-7)
    assert plotting.solver_name("ddim=euler") == "DDIM = Euler (EDM)"


def test_rows_agreeing_to_1e12_are_merged_and_others_are_not():
    a = _regime("a", "x", [1.0, 2.0], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3])
    b = _regime("b", "y", [1.0, 2.0 * (1 + 1e-13)], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3])
    c = _regime("c", "z", [1.0, 2.0 * (1 + 1e-9)], [0.5, 0.6], [0.2, 0.3], [0.25, 0.3])
    kept, merged = evidence.merge_regimes([a, b, c], "solver", (), equivalent={})
    assert [r["params"]["solver"] for r in kept] == ["x=y", "z"]
    assert merged[0]["reason"] == "numerical"


def test_verdicts_use_corrected_paired_intervals_and_tag_quick_runs():
    clear = _regime("clear", "s", [1.0, 1.1, 0.9, 1.05], [0.5, 0.6, 0.4, 0.52], [0.10, 0.11, 0.09, 0.1],
                    [0.20, 0.22, 0.19, 0.21])
    noisy = _regime("noisy", "s", [1.0, 0.2, 1.8], [0.9, 1.0, 1.0], [0.10, 0.11, 0.09], [0.20, 0.21, 0.19])
    v = evidence.verdicts([clear, noisy], "w2")
    by = {r["label"]: r for r in v["regimes"]}
    assert by["clear"]["verdict"] == "paradox" and by["noisy"]["verdict"] != "paradox"
    assert v["correction"] == {"method": "holm", "alpha": 0.05, "num_comparisons": 2}
    assert by["clear"]["dE"]["low"] > 0 and by["clear"]["dQ"]["low"] > 0
    q = evidence.verdicts([clear], "w2", quick=True)
    assert q["regimes"][0]["quick"] is True
    assert evidence.summary_line(q, True, "W2").startswith("[quick: not evidence]")
    # the intervals are at the corrected levels (Holm over 2: 97.5% for the first, 95% after a rejection), and
    # the line says so instead of calling them 95% intervals
    assert sorted(r["level"] for r in v["regimes"]) == pytest.approx([0.95, 0.975])
    line = evidence.summary_line(v, False, "W2")
    assert "exclude 0 at the holm-corrected levels 95%-97.5% (family-wise error 0.05 over 2 regimes)" in line, line
    plain = evidence.summary_line(evidence.verdicts([clear, noisy], "w2", method="none"), False, "W2")
    assert "exclude 0 at 95% (no correction)" in plain, plain
    r = evidence.add_differences(clear)
    assert r["differences"]["E"]["mean"] == pytest.approx(0.5075)


def test_convergence_flags_and_curve_recorder():
    assert evidence.converged_flags([1.0, 1.0], [1.04, 1.2]) == [True, False]
    rec = CurveRecorder("cell", {}, [2, 4, 8, 12])
    for step, e in ((2, [1.0, 1.0]), (4, [0.5, 0.9]), (8, [0.49, 0.5]), (12, [0.48, 0.5])):
        rec.record(step, "cd", {"E": e, "w2": [0.1, 0.2]})
    d = rec.to_dict()
    assert d["converged"]["cd"] == [None, [False, False], [True, False], None]  # 12/2 = 6 is not a curve step
    assert d["methods"]["cd"]["E"]["mean"] == pytest.approx([1.0, 0.7, 0.495, 0.49])
    half = rec.to_dict(slice(1, 2))
    assert half["methods"]["cd"]["E"]["values"][1] == [0.9]


def test_curves_need_a_constant_learning_rate_and_the_budget_of_the_last_step():
    from toys.ensemble import TrainConfig

    curves = CurveConfig(enabled=True, steps=[250, 500, 1000])
    check_curve_budget(curves, TrainConfig(train_steps=1000, lr_schedule="constant"))
    with pytest.raises(ValueError, match="must equal max"):
        check_curve_budget(curves, TrainConfig(train_steps=1500, lr_schedule="constant"))
    with pytest.raises(ValueError, match="constant"):
        check_curve_budget(curves, TrainConfig(train_steps=1000, lr_schedule="cosine"))
    with pytest.raises(ValueError, match="strictly increasing"):
        CurveConfig(steps=[500, 250])


def test_labels_have_units_and_unknown_keys_are_refused():
    assert plotting.label("w2_p0") == "W2 to p_0 (data units)"
    assert plotting.label("w2_teacher") == "W2 to the teacher's samples (data units)"
    assert "nats" in plotting.label("nll_p0")
    from studies.score_error_report import PLOT_KEYS, TABLE_KEYS

    for key in (*PLOT_KEYS, *TABLE_KEYS, "E", "E_exact", "fd", "E_decoded", "w2", "variance_ratio"):
        text = plotting.label(key)
        assert text != key and "(" in text, key
    with pytest.raises(KeyError, match="no axis label"):
        plotting.label("w2_somewhere")
    assert plotting.title("x", True).startswith(plotting.SMOKE_LABEL) and plotting.title("x", False) == "x"


def test_save_writes_png_and_pdf(tmp_path):
    fig, axes = plotting.new_figure(1, 1)
    axes[0, 0].plot([0, 1], [0, 1], label="line")
    plotting.floor_band(axes[0, 0], {"mean": 0.5, "sd": 0.1, "values": [0.4, 0.5, 0.6] * 4})
    handles, labels = axes[0, 0].get_legend_handles_labels()
    assert "line" in labels and any("floor" in lab for lab in labels)
    out = plotting.save(fig, tmp_path / "fig.png")
    assert [p.suffix for p in out] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in out)


def test_curve_plot_handles_metrics_not_defined_for_a_cell(tmp_path):
    """A curve whose metric is NaN throughout (the mechanism of an exact teacher) gets a note, not a crash."""
    from studies.curves import plot_curves

    rec = CurveRecorder("exact", {}, [2, 4])
    nan = float("nan")
    for step, e in ((2, [1.0, 0.8]), (4, [0.5, 0.4])):
        rec.record(step, "cd", {"E": e, "mech_correlation": [nan, nan]})
    out = plot_curves([rec.to_dict()], tmp_path / "curves.png", ["E", "mech_correlation"], quick=True, title="t")
    assert [p.suffix for p in out] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in out)
