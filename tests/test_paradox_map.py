"""studies.paradox_map: the quick map writes valid outputs, a planted paradox is hatched and a null is not,
k = 1 is CD and k = all is Direct CD, bad configs are refused before anything is written."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from odecm.config import load_config
from studies import paradox_map
from studies import paradox_map_engine as engine
from studies import paradox_map_report as report
from studies.common import ConfigError
from studies.paradox_map import ParadoxMapConfig
from toys.ensemble import Route, TargetPool, make_ensemble_student, train_ensemble

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["train.train_steps=40", "train.pool_size=1024", "eval.num_samples=120", "eval.max_points=120",
        "rows={name: width, values: [8, 16]}"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def test_quick_run_writes_every_output_and_the_json_validates(tmp_path):
    out = tmp_path / "run"
    metrics = paradox_map.main(["--quick", "--out", str(out), "--no-progress"] + _sets(TINY))
    for name in ("config.json", "metrics.json", "table.md", "paradox_map.png", "paradox_map.pdf"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    report.validate_metrics(saved)
    assert saved["study"] == "paradox_map" and saved["quick"] is True
    assert saved["quality"]["key"] == "w2_teacher" and saved["quality_p0"]["key"] == "w2_p0"
    regs = saved["regimes"]
    assert [r["params"] for r in regs] == [{"width": w, "score_error": d} for w in (8, 16) for d in (0.0, 0.5)]
    assert all(len(r["methods"][m]["E_solver"]["values"]) == 2 for r in regs for m in ("cd", "direct_cd"))
    assert all(len(r["converged"]["cd"]) == 2 for r in regs)  # E read at half the budget too
    v = saved["verdicts"]
    assert v["correction"] == {"method": "holm", "alpha": 0.05, "num_comparisons": 4}
    assert all(x["quick"] for x in v["regimes"]) and saved["verdicts_p0"]["correction"]["num_comparisons"] == 4
    # the measured score error: 0 for delta = 0 (the exact teacher), clearly > 0 for delta = 0.5
    se = {r["params"]["score_error"]: r["cell"]["score_error"] for r in regs}
    assert se[0.0] == 0.0 and se[0.5] > 1e-3
    assert set(saved["floors"]) == {"wrong_gmm δ=0, d=2", "wrong_gmm δ=0.5, d=2"}  # one floor per world
    table = (out / "table.md").read_text()
    assert "SMOKE RUN" in table and "[quick: not evidence]" in table and "| width=8, score_error=0.5 |" in table
    # config.json replays: the same resolved config
    replay = load_config(ParadoxMapConfig, out / "config.json")
    assert replay.model_dump() == ParadoxMapConfig.model_validate(
        {k: val for k, val in json.loads((out / "config.json").read_text()).items() if not k.startswith("_")}).model_dump()
    assert replay.train.train_steps == 40 and replay.quick
    assert metrics["timing"]["total_seconds"] > 0 and len(metrics["timing"]["load_average_start"]) == 3
    broken = copy.deepcopy(saved)
    del broken["regimes"][0]["methods"]["cd"]["w2_p0"]
    with pytest.raises(ValueError, match="methods.cd.w2_p0"):
        report.validate_metrics(broken)


@pytest.mark.parametrize("name, rows, cols", [
    ("paradox_map", [8, 128], [0.0, 0.5]),
    ("paradox_map_k", [2, "all"], [0.0, 0.5]),
    ("paradox_map_budget", [0.0, 0.5], [40, 80]),
    ("paradox_map_dim_modes", [2, 32], [2, 32]),
])
def test_quick_is_the_smoke_version_of_every_shipped_map(name, rows, cols):
    """--quick after --config: first and last value per axis (a k > 1 on a k axis, budgets 40 / 80), two
    seeds, 80 steps; --set still has the last word. The shipped default file equals the defaults."""
    path = f"studies/configs/{name}.yaml"
    args = paradox_map.common.parse_args("paradox_map", ["--quick", "--config", path, "--set", "seeds=[4, 5]"])
    cfg = paradox_map.resolve(args)
    assert cfg.quick and cfg.rows.values == rows and cfg.cols.values == cols and cfg.seeds == [4, 5]
    assert cfg.train.batch_size == 32 and cfg.eval.num_samples == 200
    assert cfg.train.train_steps == 80 and cfg.train.lr == 1e-3  # the file's other keys are kept
    full = paradox_map.resolve(paradox_map.common.parse_args("paradox_map", ["--config", path]))
    assert not full.quick and len(full.rows.values) == len(full.cols.values) == 5 and full.seeds == [0, 1, 2]
    if name == "paradox_map":
        assert full.model_dump() == ParadoxMapConfig().model_dump()


class _StubWorlds:
    """What ``build_metrics`` reads from ``Worlds``: the measured score error of each world."""

    def score_errors(self, world):
        return [0.01 * (world[0] or 0.0)]


def _planted_metrics(cells: dict[tuple[int, int], tuple[float, float]], seed: int = 0) -> dict:
    """A 2 x 3 map (width x delta, 4 seeds) whose per-seed values are synthetic: cell (i, j) gets
    ``E_cd - E_dcd ~ dE`` and ``W2_dcd - W2_cd ~ dQ`` (to the teacher and to p_0) plus seed noise."""
    cfg = ParadoxMapConfig(rows={"name": "width", "values": [8, 16]},
                           cols={"name": "score_error", "values": [0.0, 0.1, 0.2]}, seeds=[0, 1, 2, 3])
    plan = engine.plan_map(cfg)
    rng = np.random.default_rng(seed)
    res = engine.MapResults(_StubWorlds())
    for key, tr in plan.trainings.items():
        res.members[key] = [(w, s) for w in tr.worlds for s in cfg.seeds]
        res.values[key] = {2000: [], 1000: []}
    for cell in plan.cells:
        dE, dQ = cells.get((cell.row, cell.col), (0.0, 0.0))
        for m, key in (("cd", (cell.shape, engine.CD)), ("dcd", (cell.shape, cell.method))):
            for w, s in res.members[key]:
                if w != cell.world:
                    continue
                noise = rng.normal(0, 1e-3, 3)
                e = 0.05 + (dE if m == "cd" else 0.0) + noise[0]
                q = 0.2 + (dQ if m == "dcd" else 0.0) + noise[1]
                res.values[key][2000].append({"E_solver": e, "w2_teacher": q, "w2_p0": q + noise[2]})
                res.values[key][1000].append({"E_solver": e * 1.01})
    return report.build_metrics(cfg, plan, res, floors={})


def test_planted_paradox_is_hatched_and_null_cells_are_not(tmp_path):
    # (0, 1): paradox; (1, 2): Direct CD lower E but also closer samples (no paradox); the rest: null
    metrics = _planted_metrics({(0, 1): (0.5, 0.3), (1, 2): (0.5, -0.3)})
    report.validate_metrics(json.loads(json.dumps(metrics)))
    verdicts = {r["label"]: r["verdict"] for r in metrics["verdicts"]["regimes"]}
    assert verdicts["width=8, score_error=0.1"] == "paradox"
    assert verdicts["width=16, score_error=0.2"] == "Direct CD better"
    assert sum(v == "paradox" for v in verdicts.values()) == 1
    assert metrics["verdicts"]["correction"]["num_comparisons"] == 6
    fig = report.draw_map(metrics)
    gids = [[p.get_gid() for p in ax.patches if p.get_gid()] for ax in fig.axes[:3]]
    hatched = [[p.get_gid() for p in ax.patches if p.get_gid() and p.get_hatch()] for ax in fig.axes[:3]]
    assert hatched[0] == ["paradox:0,1"] and hatched[1] == ["paradox:0,1"]
    assert hatched[2] == ["paradox_p0:0,1"] and "paradox:0,1" in gids[2]  # p_0 panel: own hatch + outline
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(t.startswith("0.5*") for t in texts)  # mean and significance mark in the planted cell
    import matplotlib.pyplot as plt

    plt.close(fig)
    # a map of nulls: nothing hatched, every verdict a tie
    null = _planted_metrics({}, seed=1)
    assert all(r["verdict"] == "tie" for r in null["verdicts"]["regimes"])
    fig = report.draw_map(null)
    assert not any(p.get_hatch() for ax in fig.axes for p in ax.patches)
    plt.close(fig)


def test_k_axis_maps_k1_to_cd_and_k_all_to_direct_cd_and_the_trainer_agrees():
    N = 4
    assert engine.method_of(1, N) == engine.CD
    assert engine.method_of("all", N) == engine.DIRECT and engine.method_of(7, N) == engine.DIRECT
    assert engine.method_of(2, N) == ("cd_k", 2)
    cfg = ParadoxMapConfig(rows={"name": "k", "values": [1, 2, "all"]}, cols={"name": "score_error", "values": [0.1]},
                           world={"grid_size": N})
    plan = engine.plan_map(cfg)
    assert [c.reference for c in plan.cells] == [True, False, False]
    assert sorted(m for _, m in plan.trainings) == sorted([engine.CD, ("cd_k", 2), engine.DIRECT])  # CD shared
    # on one tiny cell, cd_k with k = 1 trains exactly the CD student, and k = all the Direct CD student
    W = engine.Worlds(cfg, plan)
    world = plan.cells[0].world
    teacher = W.teacher(world, 0)
    data = W.sample_data(world)
    pool = TargetPool.build(teacher, "ddim", plan.grid, plan.schedule, data, 256, seed=5, dtype=torch.float64)
    routes = [Route(teacher, "ddim", pool)] * 2
    net = cfg.network.model_copy(update={"width": 16})
    base = cfg.train.model_copy(update={"train_steps": 6, "batch_size": 16, "warmup_steps": 2})

    def trained(method, k=None):
        st = make_ensemble_student(net, plan.schedule, [3, 4], t_min=float(plan.grid[0]), dtype=torch.float64)
        hist = train_ensemble(base.model_copy(update={"method": method, "k": k}), st, routes, plan.grid, data,
                              progress=False)
        return st, hist

    def same(a, b, exact):
        for p, q in zip(a.net.parameters(), b.net.parameters()):
            if exact:
                assert torch.equal(p, q)
            else:
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)

    (cd, h_cd), (k1, h_k1) = trained("cd"), trained("cd_k", 1)
    same(cd, k1, exact=True)
    assert h_cd.loss == h_k1.loss
    (dcd, h_dcd), (kall, h_kall) = trained("direct_cd"), trained("cd_k", N)
    same(dcd, kall, exact=False)
    np.testing.assert_allclose(h_dcd.loss, h_kall.loss, rtol=1e-9)
    (k2, _) = trained("cd_k", 2)  # and k = 2 is neither
    assert not torch.allclose(k2.net.weights[0], cd.net.weights[0]) and not torch.allclose(k2.net.weights[0],
                                                                                          dcd.net.weights[0])


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "bogus"),
    ("rows.name=capacity", "rows.name"),
    ("cols={name: width, values: [8]}", "two different axes"),
    ("rows={name: k, values: [0, 2]}", "k: bad values"),
    ("rows={name: width, values: [8, 8]}", "listed twice"),
    ("teacher.kind=exact", "needs a teacher family with a knob"),
    ("rows={name: n_modes, values: [2, 4]}", "preset='random'"),
    ("cols={name: train_steps, values: [200, 400]}", "lr_schedule must be 'constant'"),
    ("train.method=direct_cd", "set by the map"),
    ("k=0", "k"),
    ("seeds=[]", "seeds"),
])
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, override, message):
    extra = ["train.lr_schedule=cosine"] if "train_steps" in override else []
    with pytest.raises(ConfigError, match=message):
        paradox_map.main(["--out", str(tmp_path / "x"), "--set", override] + _sets(extra))
    assert not (tmp_path / "x").exists()


def test_teacher_samples_exact_mixture_draws_and_ode_teachers_integrate():
    """Exact-mixture teachers (wrong_gmm) are sampled from their mixture; a nonconservative teacher is
    integrated through its own PF-ODE: at delta = 0 it is the exact denoiser, so its samples match the
    exact ODE solution of the same noise."""
    cfg = ParadoxMapConfig(teacher={"kind": "nonconservative"}, cols={"name": "score_error", "values": [0.0]},
                           rows={"name": "width", "values": [8]}, eval={"num_samples": 40}, seeds=[0])
    plan = engine.plan_map(cfg)
    W = engine.Worlds(cfg, plan)
    world = plan.cells[0].world
    g = torch.Generator().manual_seed(3)
    got = W._teacher_samples(world, 0, g)
    x = W.gmm(world).sample_pt(40, W.t_T, W.schedule, generator=torch.Generator().manual_seed(3),
                               dtype=torch.float64)[0]
    want = W.gmm(world).exact_ode_solution(x, W.t_T, W.t_0, W.schedule, rtol=1e-8, atol=1e-10)
    # teacher_ode (studies.score_error_world) integrates a non-mixture teacher to the schedule's smallest
    # noise level and finishes with one DDIM step to the clean point: a ~1e-2 discrepancy at most
    diff = (got - want).abs()
    assert float(diff.max()) < 3e-2 and float(diff.mean()) < 5e-3, (float(diff.max()), float(diff.mean()))
    assert float((got - x).abs().mean()) > 0.3  # it did move the noise onto the data
    cfg_w = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"kind": "wrong_gmm"})})
    Ww = engine.Worlds(cfg_w, engine.plan_map(cfg_w))
    draws = Ww._teacher_samples(world, 0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(draws, Ww.teacher(world, 0).gmm.sample_p0(40, torch.Generator().manual_seed(3),
                                                                         dtype=torch.float64)[0])
