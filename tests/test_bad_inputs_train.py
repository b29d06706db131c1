"""Checks at the door of ``sdxl.train`` and ``sdxl.precompute_targets``: a bad config or input is one
``error:`` line naming the key, the value and what is allowed, found before any model loads and before
any folder is made.

Each case runs the real ``main`` with the weight loaders replaced by a tripwire (a check that comes too
late fails the test with "model loaded") and ``ODECM_CACHE_DIR`` pointed at an empty folder (the tiny model
must not even be built); afterwards ``out_dir`` must not exist, or be exactly as it was.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("diffusers")

from odecm.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


@pytest.fixture
def door(tmp_path, monkeypatch):
    """Tripwires on every model loader, an empty odecm cache, and a helper running a command line."""
    import sdxl.build
    import sdxl.precompute_targets
    import sdxl.train

    def tripwire(*args, **kwargs):
        raise AssertionError("model loaded before the checks at the door finished")

    for module in (sdxl.build, sdxl.precompute_targets):
        monkeypatch.setattr(module, "load_sdxl", tripwire)
    monkeypatch.setattr(sdxl.train, "build_run", tripwire)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ODECM_CACHE_DIR", str(cache))
    out = tmp_path / "run"

    def run(overrides: list[str], extra: list[str] = (), command: str = "train", out_dir: str | None = None) -> str:
        module = sdxl.train if command == "train" else sdxl.precompute_targets
        argv = ["--config", "tiny_cpu", "--set", f"out_dir={out if out_dir is None else out_dir}",
                *[o.replace("{tmp}", str(tmp_path)) for o in overrides], *extra]
        before = _tree(out)
        with pytest.raises(ConfigError) as err:
            module.main(argv)
        assert _tree(out) == before, "the command wrote into out_dir"
        assert not cache.exists(), "the tiny model was built"
        return str(err.value)

    return SimpleNamespace(run=run, tmp=tmp_path, out=out)


def _fake_targets(folder: Path, solver: str = "ddim", complete: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text(json.dumps({
        "complete": complete, "shards": {}, "solver": solver, "grid_size": 10, "grid": "skip", "timestep_offset": 0,
        "guidance_scale": 9.0, "cfg_convention": "imagen", "uncond": "zeros", "model": "tiny"}))
    return folder


TRAIN_CASES = [  # id, overrides, fragments the message must hold
    ("train_steps_boolean", ["distill.train_steps=true"], ["distill.train_steps", "boolean"]),
    ("lr_inf", ["distill.optim.lr=inf"], ["distill.optim.lr", "inf"]),
    ("lr_above_float32", ["distill.optim.lr=1e39"], ["distill.optim.lr", "3.4e38"]),
    ("grid_not_dividing_T", ["distill.grid_size=7"], ["distill.grid_size=7 does not divide", "1000", "allowed"]),
    ("skip_grid_N_equals_T", ["distill.grid_size=1000"], ["distill.grid_size=1000", "t_0 = t_1 = 0",
                                                        "model.timestep_offset=1"]),
    ("missing_image_folder", ["data.source=images", "data.path={tmp}/no_images"], ["data.path=", "no such"]),
    ("missing_latent_cache", ["data.source=latent_cache", "data.path={tmp}/no_cache"], ["data.path=", "no such folder",
                                                                                    "sdxl.latent_cache"]),
    ("incomplete_latent_cache", ["data.source=latent_cache", "data.path={tmp}"], ["data.path=", "not a complete"]),
    ("targets_without_index", ["distill.method=direct_cd", "data.source=targets", "data.path={tmp}"],
     ["data.path=", "index.json", "precompute_targets"]),
    ("targets_of_another_solver", ["distill.method=direct_cd", "data.source=targets", "data.path={tmp}/targets",
                                   "distill.solver=heun_vp"], ["distill.solver='heun_vp'", "made with 'ddim'"]),
    ("incomplete_targets", ["distill.method=direct_cd", "data.source=targets", "data.path={tmp}/partial"],
     ["data.path=", "incomplete"]),
    ("fewer_samples_than_a_batch", ["data.num_samples=2"], ["data.num_samples=2", "one batch per process (4)"]),
    ("xformers_missing", ["speed.attention=xformers"], ["speed.attention='xformers'", "pip install xformers"]),
    ("wandb_missing", ["log_with=wandb"], ["log_with='wandb'", "pip install wandb"]),
    ("model_folder_missing", ["model.pretrained={tmp}/no_model"], ["model.pretrained=", "no such folder", "org/name"]),
    ("model_folder_not_diffusers", ["model.pretrained={tmp}"], ["model.pretrained=", "model_index.json"]),
    ("vae_missing", ["model.vae=./no/such/vae"], ["model.vae=", "no such folder"]),
    ("validation_k_above_N", ["validation.every=1", "validation.steps=[1,20]"], ["validation.steps", "k=20",
                                                                              "distill.grid_size=10"]),
    ("unknown_key", ["distill.solverr=ddim"], ["distill.solverr", "unknown key"]),
    ("old_key_name", ["distill.num_steps=10"], ["distill.num_steps", "distill.grid_size"]),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_at_the_door(door, overrides, fragments):
    _fake_targets(door.tmp / "targets")
    _fake_targets(door.tmp / "partial", complete=False)
    message = door.run(overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not door.out.exists()


def test_bitsandbytes_missing_names_the_key_and_the_install(door, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    message = door.run(["distill.optim.name=adamw8bit"])
    assert "distill.optim.name='adamw8bit'" in message and "pip install bitsandbytes" in message


def test_every_problem_is_listed_at_once(door):
    message = door.run(["distill.grid_size=7", "speed.attention=xformers", "data.num_samples=2"])
    assert len(message.splitlines()) == 3


def test_batch_not_divisible_by_processes(door, monkeypatch):
    import sdxl.train

    monkeypatch.setattr(sdxl.train, "make_accelerator", lambda cfg, trackers=False: SimpleNamespace(num_processes=3))
    message = door.run(["distill.batch_size=4"])
    assert "distill.batch_size=4 is not divisible by the 3 processes" in message and "a multiple of 3" in message


def test_empty_out_dir_never_means_the_current_directory(door, monkeypatch, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    message = door.run([], out_dir="")
    assert "out_dir: empty" in message and list(cwd.iterdir()) == []


def test_non_empty_out_dir_without_resume(door):
    door.out.mkdir()
    (door.out / "log.jsonl").write_text('{"step": 1}\n')
    message = door.run([])
    assert "is not empty" in message and "overwrite" in message


def test_resume_latest_without_a_checkpoint_is_an_error_not_a_fresh_start(door):
    message = door.run([], ["--resume", "latest"])
    assert "resume='latest': nothing to resume" in message and not door.out.exists()
    door.out.mkdir()
    message = door.run([], ["--resume", "latest"])
    assert "nothing to resume" in message and list(door.out.iterdir()) == []


PRECOMPUTE_CASES = [
    ("cd_targets", ["distill.method=cd"], ["distill.method='cd'", "Direct CD", "allowed: 'direct_cd'"]),
    ("from_targets", ["distill.method=direct_cd", "data.source=targets", "data.path={tmp}/targets"],
     ["data.source='targets'", "allowed"]),
    ("grid_not_dividing_T", ["distill.method=direct_cd", "distill.grid_size=7"], ["distill.grid_size=7"]),
    ("missing_images", ["distill.method=direct_cd", "data.source=images", "data.path={tmp}/none"], ["data.path="]),
]


@pytest.mark.parametrize("overrides, fragments", [c[1:] for c in PRECOMPUTE_CASES], ids=[c[0] for c in PRECOMPUTE_CASES])
def test_precompute_refuses_at_the_door(door, overrides, fragments):
    _fake_targets(door.tmp / "targets")
    message = door.run(overrides, command="precompute")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not door.out.exists()


def test_precompute_refuses_a_folder_of_another_config(door):
    foreign = door.tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not targets")
    message = door.run(["distill.method=direct_cd", f"precompute.out={foreign}"], command="precompute")
    assert "precompute.out" in message and "not empty" in message
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_errors_print_one_line_each_without_traceback(door, capsys):
    from odecm.cli import run_main
    from sdxl.train import main

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--config", "tiny_cpu", "--set", f"out_dir={door.out}", "distill.grid_size=7",
                        "data.num_samples=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "Traceback" not in "\n".join(err) and not door.out.exists()


def test_command_line_error_is_one_line(tmp_path):
    """The real entry point: exit status 2, one ``error:`` line, nothing written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sdxl.train", "--config", "tiny_cpu", "--set", f"out_dir={out}",
                           "distill.optim.lr=1e39"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "ODECM_CACHE_DIR": str(tmp_path / "c"),
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "distill.optim.lr" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "c").exists()
