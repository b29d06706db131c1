"""Two CPU processes (gloo), one fed a NaN: every skip / stop decision is taken by all ranks together.

A per-rank decision deadlocks: the rank that skips never joins DDP's gradient all-reduce, which the
other rank waits in. The processes run under a timeout, so a regression fails instead of hanging.
Scenario 1 (accelerate + DDP): rank 1's loss is NaN at one step; both ranks skip it, go on, and end
with equal weights. Scenario 2 (plain torch DDP, no accelerate): rank 1's loss is NaN from step 3 on;
both ranks stop with ``NonFiniteLossError`` at the same step, the last good checkpoint published.

This file is also the worker: ``torchrun --nproc_per_node 2 tests/test_trainer_distributed.py OUT``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_ranks_nan_skips_and_stops_every_rank_together(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the two processes deadlocked (a per-rank skip decision?)\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1))
    # scenario 1: both skipped step 3 only, finished, and hold the same weights and run id
    for r in (r0, r1):
        assert r["skip"]["skipped"] == [3] and r["skip"]["nonfinite"] == 1 and r["skip"]["step"] == 5
    assert r0["skip"]["weights"] == r1["skip"]["weights"] and r0["skip"]["run_id"] == r1["skip"]["run_id"]
    assert r0["skip"]["latest"] == "step_0000005"
    # scenario 2: both stopped together at step 4; step 2 was never followed by a good step: step 1 is latest
    for r in (r0, r1):
        assert r["stop"]["error"].startswith("2 steps had a non-finite loss") and r["stop"]["step"] == 4
    assert r0["stop"]["latest"] == "step_0000001"


# ------------------------------------------------------------------------- the worker
def _scenario(out: Path, rank: int, world: int, accelerator, nan_at, train_steps: int, max_nonfinite: int) -> dict:
    import torch
    from torch import nn

    from odecm.training import NonFiniteLossError, Trainer, TrainerConfig, latest_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    else:
        model = nn.parallel.DistributedDataParallel(model)

    def loss_fn(step, gen):
        x = torch.randn(8, 4, generator=gen)[rank::world]  # the global batch, drawn alike on every rank
        loss = (model(x) - x[:, :1]).pow(2).mean()
        return {"loss": loss * float("nan") if rank == 1 and nan_at(step) else loss}

    cfg = TrainerConfig(train_steps=train_steps, checkpoint_every=1, max_nonfinite=max_nonfinite, progress=False)
    trainer = Trainer(model, opt, loss_fn, out, cfg, accelerator=accelerator)
    result: dict = {}
    try:
        trainer.run()
    except NonFiniteLossError as exc:
        result["error"] = str(exc)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    latest = latest_checkpoint(out)
    result.update(step=trainer.step, nonfinite=trainer.nonfinite, run_id=trainer.run_id,
                  skipped=[r["step"] for r in trainer.history if r.get("skipped_nonfinite")],
                  weights=hashlib.sha256(weights.numpy().tobytes()).hexdigest(), latest=latest.name if latest else None)
    return result


def _worker(out: Path) -> None:
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator()  # initialises the gloo process group from torchrun's environment
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    results = {
        "skip": _scenario(out / "skip", rank, world, acc, lambda s: s == 2, train_steps=5, max_nonfinite=3),
        "stop": _scenario(out / "stop", rank, world, None, lambda s: s >= 2, train_steps=10, max_nonfinite=1),
    }
    (out / f"result_{rank}.json").write_text(json.dumps(results))
    acc.wait_for_everyone()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
