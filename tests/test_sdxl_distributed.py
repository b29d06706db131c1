"""Two CPU processes (torch.distributed gloo via torchrun + accelerate) == one process.

The global batch is drawn identically on every rank and rank r takes slots r, r + 2, ...; DDP
averages the two half-batch gradients, so the loss curve and the trained LoRA must equal a
single-process run with the same (global) batch, up to float reduction order.

(``accelerate launch --cpu --num_processes 2`` only starts several CPU processes through mpirun;
``torchrun`` with ``ACCELERATE_USE_CPU=1`` is the dependency-free way, and what this test uses.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(tmp_path, tiny_sdxl_dir):
    from safetensors.torch import load_file

    from sdxl.data import make_synthetic_dataset

    images = tmp_path / "images"
    make_synthetic_dataset(images, 8, size=[(40, 48), (36, 36)], seed=1)
    common = ["--config", "tiny_cpu", "--set", f"model.pretrained={tiny_sdxl_dir}", "data.source=images",
              f"data.path={images}", "data.crop=random", "distill.train_steps=3", "distill.batch_size=4",
              "distill.checkpoint_every=0", "save_student=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.Popen([sys.executable, "-m", "sdxl.train", *common, f"out_dir={one}"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "sdxl.train", *common, f"out_dir={two}"],
                          cwd=REPO, env={**env, "ACCELERATE_USE_CPU": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out1, _ = p1.communicate(timeout=300)
    out2, _ = p2.communicate(timeout=300)
    assert p1.returncode == 0, out1[-3000:]
    assert p2.returncode == 0, out2[-3000:]
    a, b = _log(one), _log(two)
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["n_mean"] == rb["n_mean"] and ra["n_max"] == rb["n_max"]
        assert rb["loss_global"] == pytest.approx(ra["loss_global"], rel=1e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    assert a[0]["loss_global"] != pytest.approx(a[1]["loss_global"], rel=1e-3)  # the curve is not flat
    sa = load_file(str(one / "checkpoints" / "step_0000003" / "student.safetensors"))
    sb = load_file(str(two / "checkpoints" / "step_0000003" / "student.safetensors"))
    assert sa.keys() == sb.keys() and len(sa) > 0
    # Adam normalises each element's step, so a few near-zero gradients may flip by float noise:
    # compare whole tensors (an unsynchronised run differs by O(1) here)
    diff = sum(float((sb[k] - sa[k]).norm() ** 2) for k in sa) ** 0.5
    size = sum(float(sa[k].norm() ** 2) for k in sa) ** 0.5
    assert diff / size < 5e-3, diff / size  # measured ~7e-4; per-tensor median ~2e-5
    moved = [k for k in sa if "lora_B" in k and float(sa[k].abs().max()) > 0]
    assert moved  # training changed the LoRA (B starts at zero)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_without_deadlock(tmp_path, tiny_sdxl_dir):
    """A corrupt sample read by rank 1 only (step 3): the loss guard is all-reduced, so both ranks skip
    the step, both stop (max_nonfinite=0) with an error instead of waiting on each other, and the
    last published checkpoint is intact. Rank 0's own loss at step 3 is finite: the NaN was rank 1's."""
    from sdxl_train_fakes import sample_at, write_fake_targets

    from odecm.checkpoint import latest_checkpoint

    bad = sample_at(16, seed=0, position=9)  # global step 3, slot 1 -> rank 1 of 2
    targets = write_fake_targets(tmp_path / "targets", tiny_sdxl_dir, poison=[bad])
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "sdxl.train", "--config", "tiny_cpu", "--set", f"out_dir={out}", f"model.pretrained={tiny_sdxl_dir}",
         "distill.method=direct_cd", "data.source=targets", f"data.path={targets}", "log_with=none",
         "distill.train_steps=5", "distill.batch_size=4", "distill.checkpoint_every=1", "distill.max_nonfinite=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert output.count("error: ") >= 2 and "non-finite" in output, output[-3000:]  # both ranks stopped themselves
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and log[2].get("skipped_nonfinite")
    assert log[2]["loss"] == log[2]["loss"] and log[2]["loss_global"] != log[2]["loss_global"]  # rank 0 finite, global NaN
    assert latest_checkpoint(out).name == "step_0000001"
