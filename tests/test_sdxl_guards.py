"""fp16 loss scaling and the NaN guard end to end in ``sdxl.train`` (tiny SDXL, CPU).

* fp16: with a loss scale of 2**40 every scaled gradient overflows in fp16; the steps go through the
  grad scaler (skipped, scale halved each time), are logged as overflow skips and are not counted as
  non-finite (``max_nonfinite=0`` would stop the run otherwise); the LoRA is untouched.
* a true NaN (a corrupt sample in fp32) stops the run with a one-line error, exit status 1, and the
  last published checkpoint intact and loadable.
(The two-process case, a NaN on one rank only, is in ``test_sdxl_distributed.py``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

from sdxl_train_fakes import sample_at, write_fake_targets  # noqa: E402


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]


def _argv(out: Path, model, targets: Path, *extra: str) -> list[str]:
    return ["--config", "tiny_cpu", "--set", f"out_dir={out}", f"model.pretrained={model}", "distill.method=direct_cd",
            "data.source=targets", f"data.path={targets}", "log_with=none", "distill.max_nonfinite=0",
            "distill.checkpoint_every=1", *extra]


def test_fp16_overflow_steps_go_through_the_scaler(tmp_path, tiny_sdxl_dir):
    """(Runs after fp32 runs in the same process: sdxl.build resets accelerate's precision state.)"""
    from safetensors.torch import load_file

    from odecm.checkpoint import latest_checkpoint
    from sdxl.train import main

    targets = write_fake_targets(tmp_path / "targets", tiny_sdxl_dir)
    out = tmp_path / "fp16"
    metrics = main(_argv(out, tiny_sdxl_dir, targets, "distill.train_steps=2", "speed.mixed_precision=fp16",
                         f"speed.fp16_init_scale={2.0 ** 40}", "speed.gradient_checkpointing=false"))
    log = _log(out)
    assert [r.get("skipped_overflow") for r in log] == [True, True]
    assert [r["loss_scale"] for r in log] == [2.0 ** 39, 2.0 ** 38]
    assert not any(r.get("skipped_nonfinite") for r in log) and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (metrics["overflow_skips"], metrics["skipped_nonfinite"], metrics["optimizer_steps"]) == (2, 0, 0)
    lora = load_file(str(latest_checkpoint(out) / "student.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in lora.items() if "lora_B" in k)  # no step was taken


def test_a_nan_stops_the_run_with_the_last_good_checkpoint(tmp_path, tiny_sdxl_dir, capsys):
    """Global batch 4 of 16 samples: the NaN sample sits at position 9 of the first epoch, so step 3
    (0-based positions 8..11) has a NaN loss; steps 1 and 2 train and checkpoint."""
    from odecm.checkpoint import latest_checkpoint, read_state
    from sdxl.train import main

    bad = sample_at(16, seed=0, position=9)
    targets = write_fake_targets(tmp_path / "targets", tiny_sdxl_dir, poison=[bad])
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        main(_argv(out, tiny_sdxl_dir, targets, "distill.train_steps=5"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "non-finite" in err[0]
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and log[2].get("skipped_nonfinite")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log[:2])
    latest = latest_checkpoint(out)
    assert latest.name == "step_0000001"  # step 2's checkpoint waited for a finite loss that never came
    meta, _, weights = read_state(latest)
    assert meta["step"] == 1 and all(torch.isfinite(v).all() for v in weights["student"].values())
    assert not (out / "lora").exists() and not (out / "metrics.json").exists()


def test_mixed_precision_no_survives_yaml():
    """``--set speed.mixed_precision=no``: YAML reads a bare ``no`` as false; the config means "no"."""
    from sdxl.train_config import load_train_config

    assert load_train_config("tiny_cpu", ["speed.mixed_precision=no"]).speed.mixed_precision == "no"
    from odecm.config import ConfigError

    with pytest.raises(ConfigError, match="speed.mixed_precision: True is not allowed"):
        load_train_config("tiny_cpu", ["speed.mixed_precision=yes"])
