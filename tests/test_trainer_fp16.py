"""fp16 loss scaling: an overflow step goes through the grad scaler (skipped, scale lowered), is logged
as an overflow skip and not counted as non-finite; the scaler's state resumes bit-exactly. Both the
plain ``torch.amp.GradScaler`` path and accelerate's fp16 path (``accelerator.scaler``) run on CPU.

The model runs under CPU fp16 autocast and the scaler starts at 2**18 (GradScaler's default is
2**16), so the scaled fp16 gradients overflow until the scaler has lowered its scale a few times:
real fp16 overflows, made deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from odecm.training import NonFiniteLossError, Trainer, TrainerConfig, latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
HUGE_SCALE = 2.0 ** 18


def fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    def loss_fn(step, gen):
        x = torch.randn(32, 8, generator=gen)
        return {"loss": (model(x).float() - 4 * x[:, :1]).pow(2).mean()}

    return model, opt, sched, loss_fn


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _reference(steps: int) -> tuple[nn.Module, torch.amp.GradScaler, list[bool]]:
    """The documented GradScaler recipe, written out: scale, backward, unscale, clip, step, update;
    the lr scheduler only steps when the optimizer did."""
    model, opt, sched, loss_fn = _problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE)
    gen = torch.Generator().manual_seed(0)
    skipped = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        with fp16_autocast():
            loss = loss_fn(step, gen)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        if not skipped[-1]:
            sched.step()
    return model, scaler, skipped


def _plain(out: Path, steps: int, resume=None, checkpoint_every=0):
    model, opt, sched, loss_fn = _problem()
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE)
    cfg = TrainerConfig(train_steps=steps, checkpoint_every=checkpoint_every, max_nonfinite=0, progress=False)
    trainer = Trainer(model, opt, loss_fn, out, cfg, lr_scheduler=sched, scaler=scaler, autocast=fp16_autocast)
    trainer.run(resume=resume)
    return trainer, model, scaler


def test_grad_scaler_overflow_is_skipped_by_the_scaler_not_counted(tmp_path):
    ref_model, ref_scaler, ref_skipped = _reference(10)
    assert 1 <= sum(ref_skipped) < 10  # the problem does overflow, then trains
    trainer, model, scaler = _plain(tmp_path, 10)
    # max_nonfinite=0: one counted skip would have stopped the run
    assert trainer.nonfinite == 0 and trainer.totals["overflow_skips"] == sum(ref_skipped)
    assert trainer.totals["optimizer_steps"] == 10 - sum(ref_skipped)
    log = _log(tmp_path)
    assert [bool(r.get("skipped_overflow")) for r in log] == ref_skipped
    assert not any(r.get("skipped_nonfinite") for r in log)
    assert log[-1]["loss_scale"] == scaler.get_scale() == ref_scaler.get_scale() < HUGE_SCALE
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_state_is_checkpointed_and_resumes_bit_exactly(tmp_path):
    _, full_model, full_scaler = _plain(tmp_path / "full", 10)
    _plain(tmp_path / "split", 2, checkpoint_every=2)  # stops mid-way through the overflow phase
    stored = json.loads((latest_checkpoint(tmp_path / "split") / "state.json").read_text())["state"]["scaler"]
    assert stored["scale"] == HUGE_SCALE / 4  # two overflow skips so far
    trainer, model, scaler = _plain(tmp_path / "split", 10, resume="latest")
    assert scaler.get_scale() == full_scaler.get_scale()
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    assert trainer.totals["overflow_skips"] == sum(bool(r.get("skipped_overflow")) for r in _log(tmp_path / "split"))


def test_a_nan_loss_under_the_scaler_still_counts_and_stops(tmp_path):
    model, opt, sched, loss_fn = _problem()

    def nan_from_3(step, gen):
        terms = loss_fn(step, gen)
        return {"loss": terms["loss"] * float("nan")} if step >= 3 else terms

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    cfg = TrainerConfig(train_steps=10, max_nonfinite=2, checkpoint_every=1, progress=False)
    trainer = Trainer(model, opt, nan_from_3, tmp_path, cfg, lr_scheduler=sched, scaler=scaler, autocast=fp16_autocast)
    with pytest.raises(NonFiniteLossError, match="3 steps had a non-finite loss"):
        trainer.run()
    assert trainer.totals["overflow_skips"] == 0 and latest_checkpoint(tmp_path).name == "step_0000002"


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; reset it around a test that needs fp16."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_accelerate_fp16_overflow_goes_through_its_scaler(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    # accelerate makes no grad scaler on CPU; give it the one it makes on GPUs (its autocast then runs fp16)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE), True
    model, opt, sched, loss_fn = _problem()
    model, opt = acc.prepare(model, opt)
    cfg = TrainerConfig(train_steps=10, max_nonfinite=0, checkpoint_every=5, progress=False)
    trainer = Trainer(model, opt, loss_fn, tmp_path, cfg, lr_scheduler=sched, accelerator=acc)
    assert trainer.scaler is acc.scaler
    trainer.run()
    ref_model, ref_scaler, ref_skipped = _reference(10)
    assert [bool(r.get("skipped_overflow")) for r in _log(tmp_path)] == ref_skipped
    assert trainer.nonfinite == 0 and acc.scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(acc.unwrap_model(model).parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    stored = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["state"]["scaler"]
    assert stored["scale"] == ref_scaler.get_scale()
