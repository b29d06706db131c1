"""Studies: report verdict logic, --quick smoke runs of every study, reproducibility, report rendering."""
from __future__ import annotations

import json
import math

import pytest

from studies import report


# --- report logic on hand-made results ---------------------------------------------------------

def _regime(label, e_cd, e_dcd, q_cd, q_dcd, **params):
    return {"label": label, "params": params, "switches": {},
            "methods": {"cd": {"E": report.stat(e_cd), "w2": report.stat(q_cd)},
                        "direct_cd": {"E": report.stat(e_dcd), "w2": report.stat(q_dcd)}}}


def test_stat_matches_statistics_module():
    import statistics

    v = [0.3, 0.1, 0.7, 0.2]
    s = report.stat(v)
    assert s["mean"] == pytest.approx(statistics.mean(v))
    assert s["std"] == pytest.approx(statistics.stdev(v))
    assert report.stat([2.0])["std"] == 0.0


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    x, y = [1, 2, 3, 4, 5, 5], [0.3, 0.1, 0.9, 0.8, 1.5, 0.2]
    assert report.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(report.spearman([1, 2], [3, 4]))


def test_verdicts_paradox_and_seed_spread():
    clear = _regime("a", [1.0, 1.1, 0.9], [0.5, 0.6, 0.4], [0.10, 0.11, 0.09], [0.20, 0.21, 0.19])
    noisy = _regime("b", [1.0, 0.2, 1.8], [0.9, 1.0, 1.0], [0.10, 0.11, 0.09], [0.20, 0.21, 0.19])
    dcd_wins = _regime("c", [1.0, 1.0], [0.5, 0.5], [0.3, 0.3], [0.2, 0.2])
    cd_wins = _regime("d", [0.4, 0.4], [0.5, 0.5], [0.1, 0.1], [0.2, 0.2])
    comps = report.regime_verdicts({"quality": {"key": "w2"}, "regimes": [clear, noisy, dcd_wins, cd_wins]})
    v = {c.label: c.verdict() for c in comps}
    assert v["a"] == "paradox"
    assert v["b"] == "paradox (within seed spread)"
    assert v["c"] == "no paradox: Direct CD better on both"
    assert v["d"] == "no paradox: CD better on both"
    a = comps[0]
    assert a.dE == pytest.approx(0.5) and a.dQ == pytest.approx(0.1)
    assert a.se_E == pytest.approx(0.0, abs=1e-12)  # paired differences are constant


def test_flat_rows_are_converted_to_regimes():
    rows = [{"method": m, "score_error": s, "seed": k, "E": e, "w2": q}
            for s in (0.0, 0.1) for k in range(2)
            for m, e, q in (("cd", 1.0 + k, 0.1), ("direct_cd", 0.5, 0.2 + k))]
    out = report.to_regimes("score_error", {"rows": rows, "quality": {"key": "w2"}})
    assert len(out["regimes"]) == 2
    comps = report.regime_verdicts(out)
    assert comps[0].E_cd["values"] == [1.0, 2.0] and comps[0].paradox


def test_report_from_handmade_folders(tmp_path):
    res = tmp_path / "results"
    for name, regs in {
        "inductive_bias": [dict(_regime("width=64", [1.0, 1.1], [0.5, 0.6], [0.1, 0.12], [0.2, 0.22], width=64),
                                group="capacity")],
        "latent_space": [_regime("identity", [1.0, 1.1], [0.5, 0.6], [0.3, 0.3], [0.2, 0.2], decoder="identity")],
    }.items():
        d = res / name / "run1"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"study": name, "quality": {"key": "w2"}, "regimes": regs}))
        (d / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    extra = res / "extra" / "variant"  # a newer variant kept elsewhere must not shadow the main run
    extra.mkdir(parents=True)
    (extra / "metrics.json").write_text(json.dumps({"study": "inductive_bias", "regimes": []}))
    assert report.find_latest(res, "inductive_bias") == res / "inductive_bias" / "run1"
    assert report.find_latest(res, "score_error") is None
    md, page, studies = report.build_report(res, tmp_path / "out")
    text = md.read_text()
    assert set(studies) == {"inductive_bias", "latent_space"}
    assert "inductive_bias: 1/1 regimes show the paradox" in text
    assert "latent_space: 0/1 regimes show the paradox" in text
    assert "missing: score_error, solver_ablation, sdxl_table" in text
    assert "<table>" in page.read_text()


# --- smoke runs of every study (tiny settings), shared by the tests below ---------------------

TINY = {
    "inductive_bias": ["--set", "capacity=[[8,1]]", "--set", "budgets=[10]", "--set", "ema_rates=[0.0,0.5]",
                       "--set", "dims=[2,3]", "--set", "train.train_steps=12", "--set", "eval.num_samples=128",
                       "--set", "eval.max_points=128", "--set", "network.width=8", "--set", "network.depth=1"],
    "solver_ablation": ["--set", "grid_sizes=[10]", "--set", "train.train_steps=12", "--set", "eval.num_samples=128",
                        "--set", "eval.max_points=128"],
    "latent_space": ["--set", "budgets=[10,12]", "--set", "eval.num_samples=128", "--set", "eval.max_points=128"],
}


def _run(name, out, extra=()):
    import importlib

    mod = importlib.import_module(f"studies.{name}")
    assert mod.main(["--quick", "--no-progress", "--out", str(out), *TINY[name], *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    out = {}
    for name in TINY:
        out[name] = _run(name, root / name / "run")
    return root, out


@pytest.mark.parametrize("name", list(TINY))
def test_quick_run_writes_outputs(quick_results, name):
    root, metrics = quick_results
    folder = root / name / "run"
    for f in ("config.json", "metrics.json", "table.md", f"{name}.png"):
        assert (folder / f).exists(), f
    m = metrics[name]
    assert m["study"] == name and m["regimes"]
    for r in m["regimes"]:
        for method in ("cd", "direct_cd"):
            e = r["methods"][method]["E"]
            assert len(e["values"]) == 2 and all(v > 0 and math.isfinite(v) for v in e["values"])


def test_inductive_bias_sweeps_cover_config(quick_results):
    m = quick_results[1]["inductive_bias"]
    groups = {}
    for r in m["regimes"]:
        groups.setdefault(r["group"], []).append(r["params"])
    assert groups["capacity"] == [{"width": 8, "depth": 1, "params_count": groups["capacity"][0]["params_count"]}]
    assert [p["ema"] for p in groups["target"]] == [0.0, 0.5]
    assert [p["dim"] for p in groups["dimension"]] == [2, 3]
    # the base point (ema 0, width 8, depth 1, 12 steps) is trained once and reused: same numbers
    cap = next(r for r in m["regimes"] if r["group"] == "capacity")
    ema0 = next(r for r in m["regimes"] if r["group"] == "target" and r["params"]["ema"] == 0.0)
    assert cap["methods"]["cd"]["E"]["values"] == ema0["methods"]["cd"]["E"]["values"]


def test_solver_ablation_ddim_equals_euler_and_heun_is_more_exact(quick_results):
    m = quick_results[1]["solver_ablation"]
    by = {r["label"]: r for r in m["regimes"]}
    for method in ("cd", "direct_cd"):
        e_ddim = by["ddim N=10"]["methods"][method]["E"]["mean"]
        e_euler = by["euler N=10"]["methods"][method]["E"]["mean"]
        assert e_euler == pytest.approx(e_ddim, rel=1e-3)  # same update in exact arithmetic
    t = m["teacher"]
    assert t["heun N=10"]["E_solver_vs_exact"] < t["ddim N=10"]["E_solver_vs_exact"]  # second vs first order


def test_latent_space_identity_decoder_keeps_errors(quick_results):
    m = quick_results[1]["latent_space"]
    ident = [r for r in m["regimes"] if r["params"]["decoder"] == "identity"]
    assert ident
    for r in ident:
        for method in ("cd", "direct_cd"):
            v = r["methods"][method]
            assert v["E_decoded"]["values"] == pytest.approx(v["E"]["values"], rel=1e-9)
    decs = {r["params"]["decoder"] for r in m["regimes"]}
    assert len(decs) == 3 and set(m["rank_correlation"]) == decs


def test_rerun_from_saved_config_gives_identical_numbers(quick_results, tmp_path):
    root, metrics = quick_results
    cfg_file = root / "solver_ablation" / "run" / "config.json"  # the run's own file, provenance included
    assert "_provenance" in json.loads(cfg_file.read_text())
    from studies import solver_ablation

    out = tmp_path / "again"
    assert solver_ablation.main(["--config", str(cfg_file), "--no-progress", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items()} for r in rs]  # noqa: E731
    assert strip(again["regimes"]) == strip(metrics["solver_ablation"]["regimes"])


def test_report_renders_quick_outputs(quick_results, tmp_path):
    root, _ = quick_results
    assert report.main(["--results", str(root), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    page = (tmp_path / "rep" / "report.html").read_text()
    for name in TINY:
        assert f"{name}:" in md and f"{name}.png" in md
    for title in ("Score approximation", "Latent space", "Inductive bias"):
        assert f"### {title}" in md
    assert page.count("data:image/png;base64,") == len(TINY)


def test_sdxl_table_json_is_read_as_regimes(tmp_path):
    rows = [{"row": f"{m} {s}", "method": m, "solver": s, "status": "ok",
             "k": {"1": {"ode_error_latent": e, "fid_teacher": f, "fd_dino_teacher": None}}}
            for m, s, e, f in (("cd", "ddim", 0.30, 20.0), ("direct_cd", "ddim", 0.20, 25.0))]
    folder = tmp_path / "sdxl_table"
    folder.mkdir()
    (folder / "table.json").write_text(json.dumps({"rows": rows, "columns": [], "steps": ["1"]}))
    assert report.find_latest(tmp_path, "sdxl_table") == folder
    st = report.load_study("sdxl_table", folder)
    (c,) = st.comparisons()
    assert c.label == "SDXL ddim k=1" and c.paradox and c.dE == pytest.approx(0.1) and c.dQ == pytest.approx(5.0)
