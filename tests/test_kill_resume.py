"""kill -9 and resume, CI-sized (``benchmarks.kill_resume`` is the full measurement).

The generic ``odecm.training.Trainer`` (small CD problem) is killed twice: at a random moment and in the
middle of a checkpoint write; ``sdxl.train --config tiny_cpu`` is killed once in the middle of its
second checkpoint write (the first one published), and once right after its final checkpoint is published
(before its LoRA is written: the restart must write it). Workers are forked from the test process
(``benchmarks.kill_resume_runner``) and killed with SIGKILL. Each is restarted as a user would (``--resume latest``; a fresh ``--overwrite`` start
when there was nothing to resume yet). After every kill ``checkpoints/latest`` names a complete,
readable, finite checkpoint (or does not exist yet); the finished runs equal the uninterrupted ones
bit for bit (weights, EMA target, LoRA file, per-step losses) and log each step once.
"""
from __future__ import annotations

import numpy as np
import pytest

import torch._dynamo  # noqa: F401  (the workers' first optimizer imports it; import it once, before forking)

from benchmarks.kill_resume import run_train_target
from benchmarks.kill_resume_runner import kill_all
from benchmarks.kill_resume_train import SDXL_TRAIN, TRAINER

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _no_orphans():
    yield
    assert kill_all() == 0  # every worker ended (or was killed and reaped) inside the test


def _assert_survived(result: dict, kills: int) -> None:
    assert result["kills"] == kills, result["events"]
    assert all(e["latest_ok"] for e in result["events"]), result["events"]  # latest never partial
    assert result["kills_survived"] == kills and result["published_lost"] == 0, (result["events"], result["crashes"])
    assert result["crashes"] == [] and result["problems"] == []
    assert result["runs_exact"] == result["runs"]
    assert result["max_abs_weight_diff"] == 0.0 and result["max_abs_loss_diff"] == 0.0  # bit-exact resume


def test_generic_trainer_survives_kills_at_random_and_mid_write(tmp_path):
    result = run_train_target(TRAINER, tmp_path, 2, np.random.default_rng(0), modes=["random", "write"],
                              extra={"train_steps": 24, "checkpoint_every": 4})
    _assert_survived(result, 2)
    write_kill = result["events"][-1]
    assert write_kill["mode"] == "write" and write_kill["position"] == "mid_write" and write_kill["latest_step"] >= 4
    assert any(name.startswith(".tmp_step_") for name in write_kill["leftovers"])  # the write really was cut


def test_sdxl_train_survives_a_kill_mid_checkpoint_write(tmp_path, tiny_sdxl_dir):
    result = run_train_target(SDXL_TRAIN, tmp_path, 1, np.random.default_rng(0), modes=["write"],
                              extra={"model": str(tiny_sdxl_dir), "train_steps": 2, "checkpoint_every": 1})
    _assert_survived(result, 1)
    (kill,) = result["events"]
    assert kill["position"] == "mid_write" and kill["latest_step"] == 1  # the step-2 write was cut: resumed from 1


def test_sdxl_train_killed_after_its_final_checkpoint_still_gets_its_lora(tmp_path, tiny_sdxl_dir):
    result = run_train_target(SDXL_TRAIN, tmp_path, 1, np.random.default_rng(0), modes=["final"],
                              extra={"model": str(tiny_sdxl_dir), "train_steps": 1, "checkpoint_every": 1})
    _assert_survived(result, 1)  # includes: the final LoRA file equals the uninterrupted run's
    (kill,) = result["events"]
    assert kill["position"] == "after_final_checkpoint" and kill["latest_step"] == 1
