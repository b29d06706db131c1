"""studies.score_error: smoke run of the main job (tiny settings), its outputs, and determinism."""
from __future__ import annotations

import json

import pytest
import torch

from studies import score_error
from studies.common import ConfigError

TINY = ["train.steps=40", "train.pool_size=1024", "train.batch_size=32", "eval.num_samples=150",
        "eval.max_points=100", "eval.score_error_samples=32", "network.width=16", "network.depth=2",
        "solvers=[ddim]"]


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_quick_smoke_writes_results(tmp_path):
    out = tmp_path / "run"
    args = ["--quick", "--out", str(out), "--no-progress"] + [a for s in TINY for a in ("--set", s)]
    metrics = score_error.main(args)
    for name in ("config.json", "metrics.json", "table.md", "samples.png", "metrics_vs_score_error.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["train"]["steps"] == 40 and cfg["seeds"] == [0, 1]
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["runs"]) == 2 * 2 * 1 * 2  # teachers x methods x solvers x seeds
    table = (out / "table.md").read_text()
    for teacher in ("exact", "wrong_gmm(0.3)"):
        for method in ("| cd |", "| direct_cd |", "*chain:ddim*", "*teacher_ode*"):
            assert any(teacher in line and method in line for line in table.splitlines()), (teacher, method)
    assert "*true_ode*" in table and "| floor |" in table
    refs = {(r["teacher"], r["method"]): r for r in metrics["references"]}
    # the exact teacher's ODE is the true ODE; its chain has zero error against itself
    assert refs[("exact", "teacher_ode")]["E_true_ode"] < 1e-8
    assert refs[("exact", "chain:ddim")]["E_solver"] == 0.0
    # the wrong teacher's ODE is off the true ODE, and its score error is larger than the exact one's
    assert refs[("wrong_gmm(0.3)", "teacher_ode")]["E_true_ode"] > 1e-3
    t = metrics["teachers"]
    assert t["wrong_gmm(0.3)"]["score_error"] > 1e-3 > t["exact"]["score_error"]
    for r in metrics["runs"]:
        assert r["E_solver"] > 0 and r["w2_p0"] > 0


def test_deterministic_given_seeds(tmp_path):
    small = TINY + ['teachers=[{"label": "exact", "kind": "exact"}]', "seeds=[3]", "methods=[cd]",
                    "eval.quality_vs_teacher=false", "train.steps=15", "plots=false", "eval.floor=false"]
    runs = []
    for i in range(2):
        args = ["--out", str(tmp_path / f"r{i}"), "--no-progress"] + [a for s in small for a in ("--set", s)]
        runs.append(score_error.main(args)["runs"])
    assert runs[0] == runs[1]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        score_error.main(["--out", str(tmp_path), "--set", "trian.steps=3"])
    with pytest.raises(ConfigError, match="solvers"):
        score_error.main(["--out", str(tmp_path), "--set", "solvers=[rk4]"])
