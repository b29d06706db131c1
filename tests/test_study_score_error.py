"""studies.score_error: smoke run of the main job (tiny settings), its outputs, and determinism."""
from __future__ import annotations

import json

import pytest
import torch

from studies import score_error
from studies.common import ConfigError

TINY = ["train.train_steps=40", "train.pool_size=1024", "train.batch_size=32", "eval.num_samples=150",
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
    assert cfg["train"]["train_steps"] == 40 and cfg["seeds"] == [0, 1]
    prov = cfg["_provenance"]
    assert prov["quick"] is True and len(prov["git_commit"] or "x" * 40) == 40 and prov["versions"]["torch"]
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


SMALL = [s for s in TINY if not s.startswith("train.train_steps=")] + [
    'teachers=[{"label": "exact", "kind": "exact"}]', "seeds=[3]", "methods=[cd]", "eval.quality_vs_teacher=false",
    "train.train_steps=15", "plots=false", "eval.floor=false"]


def test_deterministic_given_seeds_and_replayable_from_config_json(tmp_path):
    # both override forms: one --set with several pairs, and repeated --set
    args = ["--out", str(tmp_path / "r0"), "--no-progress", "--set", *SMALL[:3]] + [a for s in SMALL[3:] for a in ("--set", s)]
    first = score_error.main(args)["runs"]
    again = score_error.main(["--out", str(tmp_path / "r1"), "--no-progress"] + [a for s in SMALL for a in ("--set", s)])
    assert again["runs"] == first
    # the config.json a run writes is a valid --config and reproduces the numbers exactly
    replay = score_error.main(["--config", str(tmp_path / "r0" / "config.json"), "--out", str(tmp_path / "r2"),
                               "--no-progress"])
    assert replay["runs"] == first


def test_a_key_given_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="given twice"):
        score_error.main(["--out", str(tmp_path / "x"), "--set", "seeds=[1]", "--set", "seeds=[2]"])
    assert not (tmp_path / "x").exists()


def test_out_folder_with_results_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds results"):
        score_error.main(["--out", str(out), "--no-progress"] + [a for s in SMALL for a in ("--set", s)])
    assert (out / "metrics.json").read_text() == "{}"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        score_error.main(["--out", str(tmp_path), "--set", "trian.train_steps=3"])
    with pytest.raises(ConfigError, match="solvers"):
        score_error.main(["--out", str(tmp_path), "--set", "solvers=[rk4]"])
    with pytest.raises(ConfigError, match="num_steps: renamed; use grid_size"):
        score_error.main(["--out", str(tmp_path), "--set", "num_steps=10"])
    with pytest.raises(ConfigError, match="train.steps: renamed; use train.train_steps"):
        score_error.main(["--out", str(tmp_path), "--set", "train.steps=10"])
