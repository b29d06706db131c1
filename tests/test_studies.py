"""Studies latent_space, inductive_bias, solver_ablation: --quick smoke runs (outputs, schema, smoke marks, PNG + PDF),
merged rows, reproducibility from config.json, the Python API, and that the report reads them."""
from __future__ import annotations

import json
import math

import pytest

from studies import report


# --- smoke runs of every study (tiny settings), shared by the tests below ---------------------

TINY = {
    "inductive_bias": ["--set", "capacity=[[8,1]]", "--set", "budgets=[10]", "--set", "ema_rates=[0.0,0.5]",
                       "--set", "dims=[2,3]", "--set", "train.train_steps=12", "--set", "eval.num_samples=128",
                       "--set", "eval.max_points=128", "--set", "network.width=8", "--set", "network.depth=1"],
    "solver_ablation": ["--set", "grid_sizes=[10]", "--set", "train.train_steps=12", "--set", "eval.num_samples=128",
                        "--set", "eval.max_points=128", "--set", "solvers=[ddim,euler,euler_vp,heun_vp,heun]"],
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
    for f in ("config.json", "metrics.json", "table.md", f"{name}.png", f"{name}.pdf"):
        assert (folder / f).stat().st_size > 0, f
    m = metrics[name]
    assert m["study"] == name and m["regimes"] and m["quick"] is True
    assert json.loads((folder / "config.json").read_text())["quick"] is True
    assert "SMOKE RUN" in (folder / "table.md").read_text()
    assert m["verdicts"]["regimes"] and all(v["quick"] for v in m["verdicts"]["regimes"])
    for r in m["regimes"]:
        for method in ("cd", "direct_cd"):
            e = r["methods"][method]["E"]
            assert len(e["values"]) == 2 and all(v > 0 and math.isfinite(v) for v in e["values"])
            assert len(r["converged"][method]) == 2
        assert "eval_intervals" in r and "differences" in r
    floors = m["floor"].values() if name != "solver_ablation" else [m["floor"]]
    for fl in floors:
        assert all(len(v["values"]) >= 10 for v in fl.values())
    assert m["budget"]["train_steps"] > 0 and "convergence_rule" in m["budget"]


def test_inductive_bias_sweeps_cover_config(quick_results):
    m = quick_results[1]["inductive_bias"]
    groups = {}
    for r in m["regimes"]:
        groups.setdefault(r["group"], []).append(r["params"])
    assert groups["capacity"] == [{"width": 8, "depth": 1, "params_count": 8 * (2 + 33) + 8 + 8 * 2 + 2}]
    assert [p["ema"] for p in groups["target"]] == [0.0, 0.5]
    assert [p["dim"] for p in groups["dimension"]] == [2, 3]
    # the base point (ema 0, width 8, depth 1, 12 steps) is trained once and reused: same numbers
    cap = next(r for r in m["regimes"] if r["group"] == "capacity")
    ema0 = next(r for r in m["regimes"] if r["group"] == "target" and r["params"]["ema"] == 0.0)
    assert cap["methods"]["cd"]["E"]["values"] == ema0["methods"]["cd"]["E"]["values"]


def test_solver_ablation_merges_edm_euler_into_ddim_and_keeps_the_paper_solvers(quick_results):
    m = quick_results[1]["solver_ablation"]
    by = {r["label"]: r for r in m["regimes"]}
    assert set(by) == {"ddim=euler N=10", "euler_vp N=10", "heun_vp N=10", "heun N=10"}
    assert [(r["kept"], r["dropped"], r["reason"]) for r in m["merged"]] == [("ddim", "euler", "declared")]
    t = m["teacher"]
    assert t["heun N=10"]["E_solver_vs_exact"]["mean"] < t["ddim N=10"]["E_solver_vs_exact"]["mean"]  # 2nd vs 1st order
    assert len({round(t[f"{s} N=10"]["E_solver_vs_exact"]["mean"], 12) for s in ("ddim", "euler_vp", "heun_vp")}) == 3


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
    assert again["quick"] is True  # the smoke mark lives in the config, so a replay keeps it


def test_python_api_writes_nothing_without_a_folder(tmp_path, monkeypatch):
    from studies import solver_ablation

    monkeypatch.chdir(tmp_path)
    cfg = solver_ablation.SolverAblationConfig.model_validate(
        {"quick": True, "seeds": [0, 1], "grid_sizes": [4], "solvers": ["ddim"], "network": {"width": 8, "depth": 1},
         "train": {"train_steps": 6, "pool_size": 256, "batch_size": 16, "warmup_steps": 1},
         "eval": {"num_samples": 64, "max_points": 64, "n_resamples": 100, "exact_ode": False}})
    res = solver_ablation.run(cfg)
    assert res["regimes"] and list(tmp_path.iterdir()) == []
    out = tmp_path / "a" / "b"
    solver_ablation.run(cfg, out_dir=out)
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.json", "table.md", "solver_ablation.png",
                                                "solver_ablation.pdf"}


def test_report_reads_the_quick_outputs(quick_results, tmp_path):
    """The report (studies.report, another module) reads this schema; smoke runs only with --include-quick."""
    root, _ = quick_results
    assert report.main(["--results", str(root), "--out", str(tmp_path / "rep"), "--include-quick"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in TINY:
        assert name in md




# --- checks at the door of the configs (no study runs) ------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["sdxl", "vp", "edm"])
@pytest.mark.parametrize("grid", ["skip", "uniform", "karras"])
@pytest.mark.parametrize("n", [1, 7, 20, 30, 40, 1000, 1001])
def test_grid_problem_agrees_with_building_the_grid(schedule, grid, n):
    """``cells.grid_problem`` (the configs' check) refuses exactly the grids ``odecm.grids.make_grid`` cannot build."""
    from odecm.grids import make_grid
    from studies.cells import grid_problem, make_world_schedule

    problem = grid_problem(grid, schedule, n, timestep_offset=1)
    try:
        make_grid(grid, make_world_schedule(schedule, 1), n)
        built = True
    except ValueError:
        built = False
    assert built == (problem is None), problem
    if problem and schedule == "sdxl":
        assert f"grid_size={n} must divide 1000" in problem


def test_world_configs_refuse_a_grid_the_schedule_cannot_build():
    from odecm.config import ConfigError, validate
    from studies.cells import WorldConfig

    assert validate(WorldConfig, {"grid_size": 50}).grid_size == 50
    assert validate(WorldConfig, {"schedule": "vp", "grid": "uniform", "grid_size": 7}).grid_size == 7
    with pytest.raises(ConfigError, match=r"grid_size: grid_size=30 must divide 1000"):
        validate(WorldConfig, {"grid_size": 30})
    with pytest.raises(ConfigError, match=r"grid: grid='skip' needs a discrete schedule"):
        validate(WorldConfig, {"schedule": "edm"})


def test_build_world_takes_an_explicit_grid_size_and_solver_as_given():
    """``grid_size=0`` is not "the config's": it reaches the grid (and fails there) instead of training N = 20."""
    from studies.cells import DataConfig, WorldConfig, build_world

    w = build_world(DataConfig(), WorldConfig(grid_size=20), solver="heun_vp", grid_size=10)
    assert w.grid.numel() == 11 and w.solver == "heun_vp"
    assert build_world(DataConfig(), WorldConfig(grid_size=20)).grid.numel() == 21
    with pytest.raises(ValueError, match="num_steps=0"):
        build_world(DataConfig(), WorldConfig(), grid_size=0)


def test_train_pool_seed_is_gone_but_old_config_files_replay():
    """``TrainConfig.pool_seed`` was never read by the studies (pools: ``studies.seeding``): an old config.json's
    default is dropped on load; another value is refused, naming where pool seeds come from."""
    from odecm.config import ConfigError, validate
    from toys.ensemble import TrainConfig

    assert "pool_seed" not in TrainConfig.model_fields
    assert "pool_seed" not in validate(TrainConfig, {"pool_seed": 12345, "train_steps": 7}).model_dump()
    with pytest.raises(ConfigError, match=r"pool_seed was removed: .*seeding.hold_fixed=\[pool\]"):
        validate(TrainConfig, {"pool_seed": 3})
