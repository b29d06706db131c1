"""The generic loop: EMA target, checkpoint/resume, non-finite guard."""
import json

import pytest
import torch
from safetensors.torch import load_file

from gaussian_problem import GaussianDenoiser, LinearPerIndexStudent
from odecm import grids, objectives as O, schedules
from odecm.consistency import ConsistencyFunction, LCMBoundary
from odecm.training import EMATarget, NonFiniteLossError, Trainer, TrainerConfig, latest_checkpoint

MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)


def test_ema_update_is_numerically_correct_and_rate_zero_is_stop_gradient():
    student = torch.nn.Linear(3, 2)
    ema = EMATarget(student, rate=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update()
    for k, v in ema.module.state_dict().items():
        expected = 0.9 * before[k] + 0.1 * student.state_dict()[k]
        assert torch.allclose(v, expected, atol=1e-7)
    assert all(not p.requires_grad for p in ema.module.parameters())
    # rate 0: the target is the online student itself, evaluated without gradients
    sg = EMATarget(student, rate=0.0)
    assert sg.is_stop_gradient and sg.network is student
    x = torch.randn(4, 3)
    out = sg(x)
    assert torch.equal(out, student(x)) and not out.requires_grad
    # an EMA with rate 0 written out longhand equals the stop-gradient target after an update
    longhand = EMATarget(student, rate=0.5)
    longhand.rate = 0.0
    longhand.update()
    assert torch.equal(longhand.module(x), sg(x))
    with pytest.raises(ValueError, match="ema_rate"):
        EMATarget(student, rate=1.0)


def _make_trainer(out_dir, steps, nan_after=None, ema=0.0, checkpoint_every=2, max_nonfinite=3):
    torch.manual_seed(0)
    sch = schedules.sdxl_schedule()
    grid = grids.skip(sch, 5)
    teacher = GaussianDenoiser(sch, MEAN, 0.25)
    student = LinearPerIndexStudent(sch, grid, 2)
    f = ConsistencyFunction(student, LCMBoundary())
    target = EMATarget(f, ema)
    provider = O.CDTarget(teacher, "ddim", grid, target)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    def loss_fn(step, gen):
        x0 = MEAN + 0.5 * torch.randn(32, 2, generator=gen, dtype=torch.float64)
        terms = O.consistency_loss(f, provider, x0, O.draw_indices(32, 5, generator=gen), grid, sch, generator=gen)
        if nan_after is not None and step >= nan_after:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    cfg = TrainerConfig(steps=steps, checkpoint_every=checkpoint_every, max_nonfinite=max_nonfinite, progress=False)
    return Trainer(f, opt, loss_fn, out_dir, cfg, target=target, lr_scheduler=sched), student


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_resume_matches_uninterrupted_run(tmp_path, ema):
    full, student_full = _make_trainer(tmp_path / "full", 8, ema=ema)
    full.run()
    first, _ = _make_trainer(tmp_path / "split", 4, ema=ema)
    first.run()
    # the pickle-free format: tensors in safetensors, everything else in state.json
    files = {p.name for p in latest_checkpoint(tmp_path / "split").iterdir()}
    assert files == {"COMPLETE", "state.json", "state.safetensors", "student.safetensors"} | (
        {"target.safetensors"} if ema else set())
    # "kill": a fresh process object resumes from the latest checkpoint and continues to 8
    second, student_resumed = _make_trainer(tmp_path / "split", 8, ema=ema)
    # scramble its RNGs to prove they are restored from the checkpoint
    torch.manual_seed(1234)
    second.run(resume="latest")
    assert second.step == 8
    for a, b in zip(student_full.parameters(), student_resumed.parameters()):
        assert torch.equal(a, b)
    if ema:
        for a, b in zip(full.target.module.parameters(), second.target.module.parameters()):
            assert torch.equal(a, b)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"loss", "grad_norm", "target_evals", "time_s"} <= set(log[0])


def test_resume_trims_the_log_atomically_and_drops_a_line_cut_by_a_kill(tmp_path, monkeypatch):
    from odecm import trainer_checkpoints

    first, _ = _make_trainer(tmp_path, 4)
    first.run()
    log_path = tmp_path / "log.jsonl"
    with log_path.open("a") as fh:  # a killed segment: step 5 logged past the checkpoint, step 6 cut short
        fh.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    before = log_path.read_text()

    def killed(path, text):  # the process dies while the trimmed log is written
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_checkpoints, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _make_trainer(tmp_path, 8)[0].run(resume="latest")
    assert log_path.read_text() == before  # the old log survives a kill during the rewrite
    monkeypatch.undo()
    second, _ = _make_trainer(tmp_path, 8)
    second.run(resume="latest")
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))


def test_nonfinite_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    trainer, student = _make_trainer(tmp_path, 20, nan_after=4, checkpoint_every=2, max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="non-finite.*Last good checkpoint"):
        trainer.run()
    assert trainer.nonfinite == 4 and trainer.step == 8
    # step 4's weights never gave a finite loss (every loss from step 5 on is NaN): the last
    # published checkpoint is step 2, and the unverified step-4 write is gone
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "step_0000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    weights = load_file(str(last / "student.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # skipped steps did not touch the weights: they still equal those after step 4, which differ from step 2's
    reference, ref_student = _make_trainer(tmp_path / "ref", 4, checkpoint_every=0)
    reference.run()
    assert torch.equal(student.a.detach(), ref_student.a.detach())
    assert not torch.equal(weights["denoiser.a"], student.a.detach())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("skipped_nonfinite")] == [5, 6, 7, 8]
    fresh, _ = _make_trainer(tmp_path, 20)
    fresh.load_checkpoint(last)
    assert fresh.step == 2


def test_checkpoint_write_is_atomic_and_leftovers_are_removed(tmp_path, monkeypatch):
    trainer, _ = _make_trainer(tmp_path, 2, checkpoint_every=2)
    trainer.run()
    good = latest_checkpoint(tmp_path)
    trainer.step = 3
    import odecm.checkpoint as C

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(C, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(publish=True)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good  # the pointer still names the last complete checkpoint
    leftovers = [p.name for p in (tmp_path / "checkpoints").glob(".tmp_*")]
    assert leftovers and not (tmp_path / "checkpoints" / "step_0000003").exists()
    # the next start removes the leftovers of the killed write, then continues from the good checkpoint
    again, _ = _make_trainer(tmp_path, 4, checkpoint_every=2)
    again.run(resume="latest")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002", "step_0000004"]
