"""odecm.cli: one override syntax for every entry point, one-line errors, replayable config files."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from odecm.cli import (
    InputError,
    add_config_args,
    config_from_args,
    positive_int,
    provenance,
    run_main,
)
from odecm.config import ConfigError, DistillConfig, load_config, save_config


def _parse(*argv):
    return add_config_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_both_set_forms_append_in_order():
    a = _parse("--set", "method=direct_cd", "grid_size=50", "--set", "solver=heun_vp")
    assert a.overrides == ["method=direct_cd", "grid_size=50", "solver=heun_vp"]
    cfg = config_from_args(DistillConfig, a)
    assert (cfg.method, cfg.grid_size, cfg.solver) == ("direct_cd", 50, "heun_vp")


@pytest.mark.parametrize("overrides, match", [
    (["grid_size=10", "grid_size=20"], "grid_size: given twice"),
    (["optim={name: adam}", "optim.lr=0.1"], "optim.lr: given twice"),
    (["optim.lr=0.1", "optim={name: adam}"], "optim: given twice"),
])
def test_a_key_given_twice_is_an_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_args(DistillConfig, _parse("--set", *overrides))


@pytest.mark.parametrize("override, match", [
    ("num_steps=10", "num_steps: renamed; use grid_size"),
    ("steps=10", "steps: renamed; use train_steps"),
    ("train_steps=true", "train_steps: expected a number, got a boolean"),
    ("optim.lr=inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=1e39", "optim.lr: .*float32"),
    ("solver=rk4", "solver: 'rk4' is not allowed; allowed values: .*'euler_vp', 'heun_vp'"),
    ("bogus=1", "bogus: unknown key; allowed keys"),
    ("grid_size=[1", "grid_size: the value '\\[1' is not valid YAML"),
])
def test_bad_values_are_one_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(DistillConfig, overrides=[override])
    assert len(str(err.value).splitlines()) == 1


def test_config_json_with_provenance_is_a_valid_config(tmp_path):
    cfg = load_config(DistillConfig, overrides=["method=direct_cd", "solver=euler_vp", "train_steps=7"])
    prov = provenance(["--set", "x=1"])
    save_config(cfg, tmp_path / "config.json", provenance=prov)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_provenance"]["argv"] == ["--set", "x=1"]
    assert set(data["_provenance"]["versions"]) >= {"python", "torch", "diffusers", "transformers", "peft"}
    assert "git_commit" in data["_provenance"] and "git_dirty" in data["_provenance"]
    assert load_config(DistillConfig, tmp_path / "config.json") == cfg


def test_threads_flag_must_be_positive():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=positive_int)
    assert ap.parse_args(["--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        ap.parse_args(["--threads", "-1"])


def test_run_main_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise InputError("data.path: /nope does not exist; give an image folder")

    with pytest.raises(SystemExit) as exc:
        run_main(main, [])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data.path: /nope does not exist; give an image folder\n"


def test_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "studies.score_error", "--out", str(tmp_path / "o"),
                           "--set", "solvers=[rk4]"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: solvers.0: 'rk4' is not allowed") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_import_odecm_loads_no_diffusers():
    code = "import sys, odecm, odecm.cli, odecm.config, odecm.solvers, odecm.training; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# --- --check: validate the command line and config, write nothing -------------------------------------------

ENTRY_POINTS = ["studies.score_error", "studies.paradox_map", "studies.image_world", "studies.latent_space",
                "studies.inductive_bias", "studies.solver_ablation", "studies.report", "studies.sdxl_table",
                "sdxl.train", "sdxl.precompute_targets", "sdxl.latent_cache", "sdxl.reference", "sdxl.sample",
                "sdxl.evaluate"]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_list_of_entry_points_is_complete():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {f"{p.parent.name}.{p.stem}" for d in ("studies", "sdxl") for p in (root / d).glob("*.py")
             if "run_main(main)" in p.read_text()}
    assert found == set(ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_takes_check(module, capsys):
    import importlib

    if module.startswith("sdxl."):
        pytest.importorskip("diffusers")
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0 and "--check" in capsys.readouterr().out


def test_check_prints_one_ok_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from studies import score_error

    monkeypatch.chdir(tmp_path)
    assert score_error.main(["--check", "--quick", "--set", "seeds=[0]"]) is None
    assert score_error.main(["--check", "--out", "given", "--overwrite"]) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(re.fullmatch(r"ok: studies\.score_error config valid \(\d+ keys\)", ln) for ln in out)
    assert _files(tmp_path) == []  # neither results/score_error/<stamp> nor --out was made


def test_check_refuses_what_a_run_refuses(tmp_path, capsys):
    from studies import score_error

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "metrics.json").write_text("{}")
    before = _files(tmp_path)
    for argv, problem in [(["--set", "solvers=[rk4]"], "solvers.0: 'rk4' is not allowed"),
                          (["--out", str(tmp_path / "full")], "already holds results")]:
        with pytest.raises(SystemExit) as exc:
            run_main(score_error.main, ["--check", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and "Traceback" not in err
    assert _files(tmp_path) == before  # --overwrite was not given: nothing cleared


def test_sdxl_check_runs_the_door_checks_without_a_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    from sdxl import train

    monkeypatch.setenv("WORLD_SIZE", "3")  # as under a launcher: tiny_cpu's batch 4 does not split over 3
    with pytest.raises(InputError, match="distill.batch_size=4 is not divisible by the 3 processes"):
        train.main(["--config", "tiny_cpu", "--set", f"out_dir={tmp_path / 'run'}", "--check"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="data.path"):
        train.main(["--config", "tiny_cpu", "--set", f"out_dir={tmp_path / 'run'}", "data.source=images",
                    f"data.path={tmp_path / 'no_such_folder'}", "--check"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        train.main(["--config", "tiny_cpu", "--set", f"out_dir={tmp_path / 'run'}", "--resume", "latest", "--check"])
    assert train.main(["--config", "tiny_cpu", "--set", f"out_dir={tmp_path / 'run'}", "--check"]) is None
    assert capsys.readouterr().out.startswith("ok: sdxl.train config valid (")
    assert _files(tmp_path) == []


def test_sdxl_data_and_eval_checks_write_nothing(tmp_path, capsys):
    """--check of latent_cache, precompute_targets, reference, sample and evaluate: the door checks run (a bad
    input fails), nothing is written, one ok line each."""
    pytest.importorskip("diffusers")
    import importlib

    from sdxl_eval_fakes import fake_reference, fake_run, fake_samples, files_under

    from sdxl.data import make_synthetic_dataset

    images = tmp_path / "images"
    make_synthetic_dataset(images, 4, size=32, seed=0)
    (tmp_path / "captions.txt").write_text("a red cat\na blue dog\n")
    ref = fake_reference(tmp_path / "ref")
    lora = fake_run(tmp_path / "run")
    samples = fake_samples(tmp_path / "samples", ref)
    lines = {
        "sdxl.latent_cache": [f"data={images}", f"out={tmp_path / 'cache'}", "model=tiny", "resolution=32",
                              "device=cpu"],
        "sdxl.precompute_targets": ["--config", "tiny_cpu", "--set", "distill.method=direct_cd",
                                    f"precompute.out={tmp_path / 'targets'}"],
        "sdxl.reference": [f"captions={tmp_path / 'captions.txt'}", "model.pretrained=tiny", "resolution=32",
                           f"cache_dir={tmp_path / 'refcache'}", f"out_dir={tmp_path / 'ref2'}"],
        "sdxl.sample": [f"reference={ref}", f"weights={lora}", f"out_dir={tmp_path / 'samples2'}"],
        "sdxl.evaluate": [f"samples={samples}", "weights.fid_inception=null"],
    }
    before = files_under(tmp_path)
    for module, argv in lines.items():
        argv = argv if argv[0] == "--config" else ["--set", *argv]
        main = importlib.import_module(module).main
        assert main([*argv, "--check"]) is None
        assert capsys.readouterr().out.startswith(f"ok: {module} config valid ("), module
    assert files_under(tmp_path) == before
    for module, key in [("sdxl.latent_cache", "data"), ("sdxl.reference", "captions"), ("sdxl.sample", "reference"),
                        ("sdxl.evaluate", "samples")]:  # the input the line reads is missing
        argv = [f"{key}={tmp_path / 'missing'}" if a.startswith(f"{key}=") else a for a in lines[module]]
        with pytest.raises(ConfigError, match=key):
            importlib.import_module(module).main(["--set", *argv, "--check"])
    assert files_under(tmp_path) == before
