"""studies.score_error: smoke run of the main job (tiny settings), its outputs, the Python API, merged rows,
curves, determinism and config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studies import score_error
from studies.common import ConfigError, InputError

TINY = ["train.train_steps=40", "train.pool_size=1024", "train.batch_size=32", "eval.num_samples=150",
        "eval.max_points=100", "eval.score_error_samples=32", "eval.n_resamples=100", "network.width=16",
        "network.depth=2", "solvers=[ddim]"]


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def test_quick_smoke_writes_results_marked_as_smoke(tmp_path):
    out = tmp_path / "run"
    metrics = score_error.main(["--quick", "--out", str(out), "--no-progress"] + _sets(TINY))
    for name in ("config.json", "metrics.json", "table.md", "samples.png", "samples.pdf",
                 "metrics_vs_score_error.png", "metrics_vs_score_error.pdf"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quick"] is True and cfg["train"]["train_steps"] == 40 and cfg["seeds"] == [0, 1]
    prov = cfg["_provenance"]
    assert len(prov["git_commit"] or "x" * 40) == 40 and prov["versions"]["torch"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["quick"] is True and saved["study"] == "score_error"
    assert saved["quality"]["key"] == "w2_teacher" and saved["quality_p0"]["key"] == "w2_p0"
    assert len(saved["runs"]) == 2 * 2 * 1 * 2  # teachers x methods x solvers x seeds
    assert all(v["quick"] for v in saved["verdicts"]["regimes"]) and saved["verdicts"]["correction"]["method"] == "holm"
    table = (out / "table.md").read_text()
    assert "SMOKE RUN" in table and "[quick: not evidence]" in table
    for teacher in ("exact", "wrong_gmm(0.3)"):
        assert any(line.startswith(f"| {teacher} / ddim | ") and "| CD |" in line for line in table.splitlines())
    assert "*chain:ddim*" in table and "*teacher_ode*" in table and "*true_ode*" in table
    refs = {(r["teacher"], r["method"]): r for r in metrics["references"]}
    # the exact teacher's ODE is the true ODE; its chain has zero error against itself
    assert refs[("exact", "teacher_ode")]["E_true_ode"]["mean"] < 1e-8
    assert refs[("exact", "chain:ddim")]["E_solver"]["mean"] == 0.0
    assert refs[("wrong_gmm(0.3)", "teacher_ode")]["E_true_ode"]["mean"] > 1e-3
    t = metrics["teachers"]
    assert t["wrong_gmm(0.3)"]["score_error"] > 1e-3 > t["exact"]["score_error"]
    # schema of a regime: per-seed values, convergence flags, intervals, mechanism (not for the exact teacher)
    reg = {r["label"]: r for r in saved["regimes"]}
    wrong = reg["wrong_gmm(0.3) / ddim"]
    assert len(wrong["methods"]["cd"]["E_solver"]["values"]) == 2 and len(wrong["converged"]["cd"]) == 2
    assert set(wrong["eval_intervals"]["paired"]) >= {"E_solver", "nll_p0", "precision_teacher"}
    assert len(wrong["mechanism"]["cd"]) == 2 and "mech_correlation" in wrong["methods"]["cd"]
    assert "mech_correlation" not in reg["exact / ddim"]["methods"]["cd"]
    assert len(saved["floor"]["w2_p0"]["values"]) >= 10
    assert saved["floor_teacher"]["wrong_gmm(0.3)"]["approximate"] is False
    # replaying the config keeps the smoke mark
    again = score_error.main(["--config", str(out / "config.json"), "--out", str(tmp_path / "again"), "--no-progress",
                             "--set", "plots=false"])
    assert again["quick"] is True and again["runs"] == metrics["runs"]


SMALL = [s for s in TINY if not s.startswith("train.train_steps=")] + [
    'teachers=[{"label": "exact", "kind": "exact"}]', "seeds=[3]", "methods=[cd]", "eval.quality_vs_teacher=false",
    "train.train_steps=15", "plots=false", "eval.floor=false"]


def test_deterministic_given_seeds_and_replayable_from_config_json(tmp_path):
    # both override forms: one --set with several pairs, and repeated --set
    args = ["--out", str(tmp_path / "r0"), "--no-progress", "--set", *SMALL[:3]] + _sets(SMALL[3:])
    first = score_error.main(args)["runs"]
    again = score_error.main(["--out", str(tmp_path / "r1"), "--no-progress"] + _sets(SMALL))
    assert again["runs"] == first
    replay = score_error.main(["--config", str(tmp_path / "r0" / "config.json"), "--out", str(tmp_path / "r2"),
                               "--no-progress"])
    assert replay["runs"] == first


def _cfg(*sets):
    from studies.common import parse_args, resolve_config

    keys = {s.split("=", 1)[0] for s in sets}
    base = [s for s in SMALL if s.split("=", 1)[0] not in keys]
    return resolve_config(score_error.ScoreErrorConfig, parse_args("score_error", _sets([*base, *sets])))


def test_python_api_returns_results_and_writes_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg()
    res = score_error.run(cfg)
    assert res["study"] == "score_error" and res["runs"] and list(tmp_path.iterdir()) == []
    nested = tmp_path / "new" / "nested"
    res2 = score_error.run(cfg, nested)
    assert (nested / "metrics.json").exists() and (nested / "config.json").exists()
    assert res2["runs"] == res["runs"]
    with pytest.raises(InputError, match="already holds results"):
        score_error.run(cfg, nested)


def test_edm_euler_rows_merge_into_ddim_and_paper_solvers_give_distinct_rows():
    res = score_error.run(_cfg("solvers=[ddim,euler,euler_vp,heun_vp]", "methods=[cd,direct_cd]", "seeds=[0,1]"))
    labels = [r["label"] for r in res["regimes"]]
    assert labels == ["exact / ddim=euler", "exact / euler_vp", "exact / heun_vp"]
    (m,) = res["merged"]
    assert (m["kept"], m["dropped"], m["reason"]) == ("ddim", "euler", "declared")
    chains = {r["solver"]: r for r in res["references"] if r["method"].startswith("chain:")}
    e = {s: chains[s]["E_true_ode"]["mean"] for s in ("ddim", "euler_vp", "heun_vp")}
    assert len({round(v, 12) for v in e.values()}) == 3  # three different solvers, three different endpoints


def test_curves_and_teacher_initialisation(tmp_path):
    res = score_error.run(_cfg("curves.enabled=true", "curves.steps=[4,8,16]", "train.train_steps=16",
                               "train.lr_schedule=constant",
                               "train.warmup_steps=2", "curves.targets=[stop_gradient,ema]", "inits=[scratch,teacher]",
                               "init_steps=3", "methods=[cd,direct_cd]", "seeds=[0,1]"))
    curves = {c["label"]: c for c in res["curves"]}
    assert set(curves) == {"exact / ddim / init=scratch", "exact / ddim / init=teacher"}
    c = curves["exact / ddim / init=teacher"]
    assert c["steps"] == [4, 8, 16] and set(c["methods"]) == {"cd", "direct_cd", "cd_ema"}
    assert len(c["methods"]["cd"]["E_solver"]["values"][0]) == 2  # per seed
    assert c["converged"]["cd"][0] is None and len(c["converged"]["cd"][1]) == 2
    regs = {r["label"]: r for r in res["regimes"]}
    assert set(regs) == {"exact / ddim / init=scratch", "exact / ddim / init=teacher"}
    assert regs["exact / ddim / init=teacher"]["converged"]["cd"] == c["converged"]["cd"][-1]


def test_set_keeps_the_study_defaults_of_a_nested_block():
    """``--set train.batch_size=64`` changes one value; the study's other train values stay (not TrainConfig's)."""
    from studies.common import parse_args, resolve_config

    cfg = resolve_config(score_error.ScoreErrorConfig, parse_args("score_error", ["--set", "train.batch_size=64"]))
    assert (cfg.train.batch_size, cfg.train.train_steps, cfg.train.pool_size) == (64, 1500, 65536)
    quick = resolve_config(score_error.ScoreErrorConfig, parse_args("score_error", ["--quick"]), score_error.QUICK)
    assert quick.quick is True and quick.train.train_steps == 250 and quick.network.time_input == "t"


def test_layers_are_defaults_then_config_file_then_quick_then_set(tmp_path):
    """``--quick --config FILE`` is a smoke run even when the file sets train / eval keys (the quick preset comes
    after the file), and ``--set`` comes after both; keys the preset leaves alone keep the file's values."""
    from studies.common import parse_args, resolve_config

    path = tmp_path / "full.yaml"
    path.write_text("train: {train_steps: 1500, batch_size: 128, lr: 0.001}\neval: {num_samples: 2000}\n"
                    "seeds: [0, 1, 2, 3]\n")

    def cfg(*argv):
        return resolve_config(score_error.ScoreErrorConfig, parse_args("score_error", list(argv)), score_error.QUICK)

    full = cfg("--config", str(path))
    assert (full.quick, full.train.train_steps, full.eval.num_samples, full.seeds) == (False, 1500, 2000, [0, 1, 2, 3])
    quick = cfg("--quick", "--config", str(path))
    assert (quick.quick, quick.train.train_steps, quick.train.batch_size, quick.eval.num_samples, quick.seeds) == (
        True, 250, 64, 300, [0, 1])
    assert quick.train.lr == 0.001  # the preset leaves lr alone: the file's value stays
    both = cfg("--quick", "--config", str(path), "--set", "train.train_steps=30", "seeds=[5]")
    assert (both.train.train_steps, both.train.batch_size, both.seeds) == (30, 64, [5])
    # a preset that is a function of the configured run (paradox_map's) sees the file and --set, then --set wins
    seen = []

    def preset(c):
        seen.append(c.seeds)
        return {"quick": True, "seeds": c.seeds[:1], "train": {"train_steps": 20}}
    args = parse_args("score_error", ["--quick", "--config", str(path), "--set", "train.batch_size=8"])
    out = resolve_config(score_error.ScoreErrorConfig, args, preset)
    assert seen == [[0, 1, 2, 3]] and (out.seeds, out.train.train_steps, out.train.batch_size) == ([0], 20, 8)
    # the curves config has a smoke version too: curve steps that end at the quick budget
    shipped = Path(__file__).resolve().parents[1] / "studies" / "configs" / "score_error_curves.yaml"
    curves = resolve_config(score_error.ScoreErrorConfig, parse_args("score_error", ["--quick", "--config", str(shipped)]),
                            score_error.quick_preset)
    assert curves.quick and curves.train.train_steps == 250 and curves.curves.steps == [125, 250]


def test_a_key_given_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="given twice"):
        score_error.main(["--out", str(tmp_path / "x"), "--set", "seeds=[1]", "--set", "seeds=[2]"])
    assert not (tmp_path / "x").exists()


def test_out_folder_with_results_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds results"):
        score_error.main(["--out", str(out), "--no-progress"] + _sets(SMALL))
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
    with pytest.raises(ConfigError, match="curves"):
        score_error.main(["--out", str(tmp_path), "--set", "curves.enabled=true"])
    with pytest.raises(ConfigError, match="hold_fixed"):
        score_error.main(["--out", str(tmp_path), "--set", "seeding.hold_fixed=[weather]"])
