"""Run policy of the loop: published checkpoints and the ``latest`` pointer, pruning by step within one
run, resume errors (nothing to resume, finished run, config changes), run folders that never mix,
only verified checkpoints become ``latest`` (lr = 1e6), whole-run totals, optimizer errors."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from odecm import checkpoint as C
from odecm.config import ConfigError
from odecm.optim import MissingPackageError, check_optimizer, make_optimizer
from odecm.runs import (MISSING, ConfigChangeError, ResumePolicy, RunDirError, check_resume_config, diff_configs,
                        grows, prepare_run_dir)
from odecm.training import NonFiniteLossError, Trainer, TrainerConfig, latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainer(out, train_steps=4, checkpoint_every=1, keep=2, nan_steps=(), lr_boost_from=None, run_config=None,
             policy=None, allow_change=(), max_nonfinite=10, seed=0, lr=1e-2):
    """A 3-layer linear float32 regression; ``lr_boost_from=k`` multiplies the lr by 1e8 (to 1e6)
    from the k-th optimizer step on; ``nan_steps`` make the loss NaN at those step indices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    boost = (lambda s: 1e8 if s >= lr_boost_from else 1.0) if lr_boost_from is not None else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, boost)

    def loss_fn(step, gen):
        x = torch.randn(16, 8, generator=gen)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        return {"loss": loss * float("nan") if step in nan_steps else loss}

    cfg = TrainerConfig(train_steps=train_steps, checkpoint_every=checkpoint_every, keep_checkpoints=keep,
                        max_nonfinite=max_nonfinite, progress=False, grad_clip=None, seed=seed)
    return Trainer(model, opt, loss_fn, out, cfg, lr_scheduler=sched, run_config=run_config, resume_policy=policy,
                   allow_change=allow_change)


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


# ------------------------------------------------------------------------- pointers and pruning
def test_prune_keeps_the_newest_by_step_number_of_this_run_only(tmp_path):
    ckdir = tmp_path / "checkpoints"
    for step, run in ((9_999_999, "me"), (10_000_000, "me"), (5, "me"), (20_000_000, "other")):
        folder = ckdir / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"run_id": run}))
        (folder / "COMPLETE").write_text("")
    (ckdir / "latest").write_text("step_0000005")  # pruning never deletes what latest names
    deleted = C.prune(ckdir, keep=1, run_id="me")
    assert [p.name for p in deleted] == ["step_9999999"]  # by name, "step_10000000" < "step_9999999"
    assert _names(tmp_path) == ["latest", "step_0000005", "step_10000000", "step_20000000"]


def test_latest_always_names_a_complete_checkpoint_and_resume_never_restarts_silently(tmp_path):
    run = tmp_path / "run"
    _trainer(run, train_steps=4, keep=1).run()
    assert _names(run) == ["latest", "step_0000004"]
    # another run's newer checkpoint in the folder: this run's pruning leaves it, and never deletes latest
    other = tmp_path / "other"
    _trainer(other, train_steps=6, keep=1).run()
    shutil.copytree(other / "checkpoints" / "step_0000006", run / "checkpoints" / "step_0000100")
    t = _trainer(run, train_steps=7, keep=1)
    t.run(resume="latest")
    assert t.resumed_from == 4 and _names(run) == ["latest", "step_0000007", "step_0000100"]
    assert latest_checkpoint(run).name == "step_0000007"
    # a dangling pointer is an error, not "no checkpoint"
    (run / "checkpoints" / "latest").write_text("step_0000005")
    with pytest.raises(C.CheckpointError, match="names step_0000005, which is missing"):
        _trainer(run, train_steps=8).run(resume="latest")


def test_resume_latest_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(C.NoCheckpointError, match="nothing to resume"):
        _trainer(tmp_path / "new").run(resume="latest")
    assert not (tmp_path / "new").exists()  # nothing was created


def test_a_fresh_start_over_existing_checkpoints_is_refused(tmp_path):
    _trainer(tmp_path, train_steps=2).run()
    with pytest.raises(RunDirError, match="already holds checkpoints.*resume='latest'"):
        _trainer(tmp_path, train_steps=4).run()


def test_resume_of_a_finished_run_reports_and_leaves_it_intact(tmp_path, capsys):
    _trainer(tmp_path, train_steps=4).run()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    t = _trainer(tmp_path, train_steps=4)
    assert t.run(resume="latest") == [] and t.finished_before_start and t.step == 4
    assert "already finished (step 4 of train_steps=4)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_resuming_an_older_checkpoint_would_rewrite_newer_ones_and_is_refused(tmp_path):
    _trainer(tmp_path, train_steps=4, keep=3).run()
    with pytest.raises(C.CheckpointError, match="older than this run's checkpoints"):
        _trainer(tmp_path, train_steps=4).run(resume=tmp_path / "checkpoints" / "step_0000002")
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(C.CheckpointError, match="not a checkpoint of out_dir"):
        _trainer(elsewhere, train_steps=6).run(resume=tmp_path / "checkpoints" / "step_0000004")


def test_pending_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    t = _trainer(tmp_path, train_steps=3, checkpoint_every=1)
    t.train_step()
    t.run_id = "x"
    t.save_checkpoint()  # pending, never verified: the process "dies" here
    assert _names(tmp_path) == [".pending_step_0000001"]
    _trainer(tmp_path, train_steps=3).run()
    assert _names(tmp_path) == ["latest", "step_0000002", "step_0000003"]


# ------------------------------------------------------------------------- verified checkpoints
def test_a_diverged_step_is_never_published(tmp_path):
    """lr = 1e6 from step 3: its weights are finite (|w| ~ 1e6) but the next loss overflows float32;
    the step-3 checkpoint is never published and resuming latest gives a finite loss."""
    t = _trainer(tmp_path, train_steps=10, lr_boost_from=2, max_nonfinite=2)
    with pytest.raises(NonFiniteLossError, match="Last good checkpoint: .*step_0000002"):
        t.run()
    weights = [p.detach() for p in t.student.parameters()]
    assert all(torch.isfinite(w).all() for w in weights) and max(float(w.abs().max()) for w in weights) > 1e5
    assert latest_checkpoint(tmp_path).name == "step_0000002" and _names(tmp_path) == ["latest", "step_0000001",
                                                                                       "step_0000002"]
    again = _trainer(tmp_path, train_steps=10)
    again.resume("latest")
    assert torch.isfinite(again.loss_fn(again.step, again.generator)["loss"])


def test_the_last_step_is_verified_by_one_more_loss_evaluation(tmp_path):
    t = _trainer(tmp_path, train_steps=3, checkpoint_every=0, lr_boost_from=2)
    with pytest.raises(NonFiniteLossError, match="weights after step 3 give a non-finite loss"):
        t.run()
    assert latest_checkpoint(tmp_path) is None and _names(tmp_path) == []
    ok = _trainer(tmp_path / "ok", train_steps=3, checkpoint_every=0)
    gen_before = ok.generator.get_state()
    ok.run()
    assert _names(tmp_path / "ok") == ["latest", "step_0000003"]
    # the extra evaluation does not consume randomness: the stored generator is the one after step 3
    stored = C.read_state(latest_checkpoint(tmp_path / "ok"))[1]["rng"]["generator"]
    assert torch.equal(stored, ok.generator.get_state()) and not torch.equal(stored, gen_before)


def test_non_finite_weights_are_not_written(tmp_path):
    t = _trainer(tmp_path)
    t.run_id = "x"
    with torch.no_grad():
        next(t.student.parameters())[0, 0] = float("nan")
    assert t.save_checkpoint() is None and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------- whole-run totals
def test_totals_describe_the_whole_run_across_resumes(tmp_path):
    first = _trainer(tmp_path, train_steps=4, checkpoint_every=2, nan_steps=(1,))
    first.run()
    t1 = first.totals
    assert (t1["steps"], t1["optimizer_steps"], t1["skipped_nonfinite"], t1["segments"]) == (4, 3, 1, 1)
    second = _trainer(tmp_path, train_steps=8, checkpoint_every=2, nan_steps=(1, 6))
    second.run(resume="latest")
    t2 = second.totals
    assert (t2["steps"], t2["optimizer_steps"], t2["skipped_nonfinite"], t2["overflow_skips"], t2["segments"]) == (
        8, 6, 2, 0, 2)
    assert t2["wall_seconds"] > t1["wall_seconds"] > 0
    assert first.totals["wall_seconds"] == t1["wall_seconds"]  # frozen once run() returns
    assert second.run_id == first.run_id and len(first.run_id) == 32  # a resume continues the same run
    stored = C.read_meta(latest_checkpoint(tmp_path))["totals"]
    assert {k: v for k, v in stored.items() if k != "wall_seconds"} == {k: v for k, v in t2.items() if k != "wall_seconds"}


# ------------------------------------------------------------------------- config changes
SDXL_LIKE = ResumePolicy(
    refuse=("distill.method", "distill.solver", "distill.grid_size", "distill.seed", "distill.optim", "model", "data"),
    note=("distill.train_steps", "distill.checkpoint_every", "data.num_workers", "log_every"),
    conditions={"distill.train_steps": (grows, "may only grow")})


def _config(**changes):
    cfg = {"distill": {"method": "cd", "solver": "ddim", "grid_size": 10, "seed": 0, "train_steps": 4,
                       "checkpoint_every": 1, "optim": {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.999]}},
           "model": {"pretrained": "tiny"}, "data": {"path": "/data", "num_workers": 0}, "log_every": 1,
           "speed": {"compile": False}}
    for key, value in changes.items():
        cur = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            cur = cur[p]
        cur[leaf] = value
    return cfg


def test_diff_configs_lists_every_leaf_difference():
    old = {"a": {"b": 1, "c": [1, 2], "d": True}, "e": "x"}
    new = {"a": {"b": 1.0, "c": (1, 3), "d": 1, "f": None}, "e": "x"}
    assert diff_configs(old, new) == [("a.c", [1, 2], [1, 3]), ("a.d", True, 1), ("a.f", MISSING, None)]
    assert diff_configs(old, old) == []


def test_resume_policy_refuses_listed_changes_and_notes_allowed_ones():
    old = _config()
    new = _config(distill__method="direct_cd", distill__optim__lr=3e-4, distill__train_steps=8, data__num_workers=4,
                  speed__compile=True)
    with pytest.raises(ConfigChangeError) as err:
        check_resume_config(old, new, SDXL_LIKE)
    text = str(err.value)
    assert "distill.method: 'cd' -> 'direct_cd'" in text and "distill.optim.lr: 0.0001 -> 0.0003" in text
    assert "speed.compile" in text  # neither refused nor noted: the default (refuse)
    assert "train_steps" not in text and "num_workers" not in text
    notes = check_resume_config(old, new, SDXL_LIKE, allow_change=("distill.method", "distill.optim.lr", "speed"))
    assert notes == ["data.num_workers: 0 -> 4", "distill.method: 'cd' -> 'direct_cd' (allowed by allow_change)",
                     "distill.optim.lr: 0.0001 -> 0.0003 (allowed by allow_change)", "distill.train_steps: 4 -> 8",
                     "speed.compile: False -> True (allowed by allow_change)"]
    with pytest.raises(ConfigChangeError, match=r"distill.train_steps: 4 -> 2 \(may only grow\)"):
        check_resume_config(old, _config(distill__train_steps=2), SDXL_LIKE)


def test_trainer_resume_checks_the_stored_config(tmp_path):
    _trainer(tmp_path, train_steps=2, run_config=_config(), policy=SDXL_LIKE).run()
    assert C.read_meta(latest_checkpoint(tmp_path))["config"] == _config()
    with pytest.raises(ConfigChangeError, match="distill.solver: 'ddim' -> 'heun'"):
        _trainer(tmp_path, 4, run_config=_config(distill__solver="heun"), policy=SDXL_LIKE).run(resume="latest")
    with pytest.raises(ConfigChangeError, match=r"loop settings.*\n  seed: 0 -> 1"):
        _trainer(tmp_path, 4, run_config=_config(), policy=SDXL_LIKE, seed=1).run(resume="latest")
    t = _trainer(tmp_path, 4, run_config=_config(distill__train_steps=4), policy=SDXL_LIKE)
    t.run(resume="latest")
    assert t.step == 4 and t.resume_notes == ["train_steps: 2 -> 4"]  # loop settings; run config unchanged


# ------------------------------------------------------------------------- run folders
def test_prepare_run_dir_never_mixes_runs(tmp_path, monkeypatch):
    for empty in (None, "", "  "):
        with pytest.raises(RunDirError, match="out_dir: empty"):
            prepare_run_dir(empty)
    fresh = prepare_run_dir(tmp_path / "a")
    assert fresh.is_dir() and not any(fresh.iterdir())
    (fresh / "old.txt").write_text("x")
    with pytest.raises(RunDirError, match="is not empty.*overwrite"):
        prepare_run_dir(fresh)
    assert prepare_run_dir(fresh, overwrite=True) == fresh and not any(fresh.iterdir())
    with pytest.raises(C.NoCheckpointError, match="nothing to resume"):
        prepare_run_dir(fresh, resume="latest")
    with pytest.raises(RunDirError, match="contradict"):
        prepare_run_dir(fresh, resume="latest", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(tmp_path / "file")
    monkeypatch.chdir(fresh)
    (fresh / "keep.txt").write_text("x")
    for here in (".", str(fresh), str(tmp_path)):
        with pytest.raises(RunDirError, match="current directory"):
            prepare_run_dir(here, overwrite=True)
    assert (fresh / "keep.txt").exists()
    run = tmp_path / "run"
    _trainer(run, train_steps=2).run()
    with pytest.raises(RunDirError, match="it holds a run: pass resume='latest'"):
        prepare_run_dir(run)
    assert prepare_run_dir(run, resume="latest") == run
    assert prepare_run_dir(run, resume=run / "checkpoints" / "step_0000002") == run


# ------------------------------------------------------------------------- optimizers
def test_missing_bitsandbytes_names_the_key_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(MissingPackageError) as err:
        check_optimizer("adamw8bit")
    text = str(err.value)
    assert "distill.optim.name='adamw8bit'" in text and "pip install bitsandbytes" in text and "CUDA only" not in text
    assert isinstance(err.value, ImportError) and isinstance(err.value, ConfigError)
    with pytest.raises(MissingPackageError, match="train.optim.name"):
        make_optimizer([nn.Parameter(torch.zeros(1))], "adamw8bit", key="train.optim.name")
    with pytest.raises(ConfigError, match=r"distill.optim.name='lion' is not allowed; allowed values: \['adam'"):
        make_optimizer([nn.Parameter(torch.zeros(1))], "lion")


def test_an_allowed_lr_change_on_resume_takes_effect(tmp_path):
    """The checkpoint's optimizer / scheduler states carry the old lr; the config's must win."""
    policy = ResumePolicy(refuse=("optim.lr",))
    first = _trainer(tmp_path, train_steps=2, run_config={"optim": {"lr": 1e-2}}, policy=policy)
    first.run()
    with pytest.raises(ConfigChangeError, match="optim.lr"):
        _trainer(tmp_path, train_steps=4, run_config={"optim": {"lr": 3e-2}}, policy=policy).run(resume="latest")
    again = _trainer(tmp_path, train_steps=4, run_config={"optim": {"lr": 3e-2}}, policy=policy,
                     allow_change=("optim.lr",), lr=3e-2)
    again.run(resume="latest")
    assert [h["lr"] for h in again.history] == [3e-2, 3e-2]
    assert again.lr_scheduler.base_lrs == [3e-2] and again.lr_scheduler.get_last_lr() == [3e-2]


def test_a_loop_setting_mirroring_a_run_config_key_is_noted_once(tmp_path, capsys):
    policy = ResumePolicy(note=("distill.train_steps",), conditions={"distill.train_steps": (grows, "may only grow")})
    _trainer(tmp_path, train_steps=2, run_config={"distill": {"train_steps": 2}}, policy=policy).run()
    again = _trainer(tmp_path, train_steps=3, run_config={"distill": {"train_steps": 3}}, policy=policy)
    again.run(resume="latest")
    assert again.resume_notes == ["distill.train_steps: 2 -> 3"]
    assert capsys.readouterr().out.count("train_steps: 2 -> 3") == 1


def test_warmup_then_is_linear_warmup_then_constant_or_half_cosine():
    import math

    from odecm.optim import constant_with_warmup, warmup_then

    cos = warmup_then("cosine", 10, 110)
    assert [cos(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cos(10) == 1.0 and abs(cos(60) - 0.5) < 1e-15 and cos(110) == 0.0 and cos(500) == 0.0
    assert abs(cos(35) - 0.5 * (1 + math.cos(math.pi * 0.25))) < 1e-15
    const = warmup_then("constant", 4, 0)
    assert [const(s) for s in (0, 3, 4, 100)] == [0.25, 1.0, 1.0, 1.0]
    assert warmup_then("cosine", 0, 100)(0) == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = constant_with_warmup(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="allowed: 'constant', 'cosine'"):
        warmup_then("linear", 0, 10)
