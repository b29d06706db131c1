"""Checkpoint, publication and resume for ``odecm.training.Trainer`` (its ``TrainerCheckpoints`` base).

Checkpoints (format: ``odecm.checkpoint``; safetensors + JSON, nothing pickled) hold the student
(and EMA target) tensors, the optimizer (torch or bitsandbytes 8-bit), lr scheduler and grad scaler
states, every RNG state (torch CPU/CUDA, the loop's generator, Python, NumPy), the step, the run id,
the whole-run totals, the loop settings and the run's config, so a resumed run continues bitwise.
A checkpoint is written only if every parameter is finite, first as ``.pending_step_K``; it is
*published* (renamed ``step_K``, named by ``latest``) only once its exact weights have been seen to
work: by the next step that is not a non-finite skip (finite loss and, without a grad scaler,
finite gradient), or at the end of training by one extra loss evaluation without a step, which
must be finite (RNG states restored afterwards). A diverged step (lr = 1e6: finite weights of
size 1e6 whose loss overflows) therefore never becomes ``latest``. Publishing prunes this run's
checkpoints to the newest ``keep_checkpoints``.

Resume policy: ``run(resume="latest")`` without a checkpoint is an error, never a fresh start; a
fresh start in a folder holding checkpoints is an error (see ``odecm.runs.prepare_run_dir``); the
loop settings may change except ``seed`` and ``grad_clip`` (``train_steps`` may only grow); the run
config is compared under ``resume_policy`` (default: no change allowed); a run already at
``train_steps`` is reported finished and left as it is. Leftover ``.tmp_*`` / ``.pending_*``
folders of killed writes are deleted when a run starts.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .atomic import write_text_atomic
from .checkpoint import load_tensors_into, rng_state, set_rng_state
from .distributed import broadcast_hex
from .runs import ResumePolicy, RunDirError, check_resume_config, grows, new_run_id, resolve_resume

__all__ = ["TrainerCheckpoints", "TRAINER_RESUME_POLICY"]

#: what a resume may change in ``TrainerConfig``: not the seed or the clipping; train_steps may only grow
TRAINER_RESUME_POLICY = ResumePolicy(refuse=("seed", "grad_clip"), default="note",
                                     conditions={"train_steps": (grows, "train_steps may only grow")})


class TrainerCheckpoints:
    """The checkpoint half of ``Trainer``: write (pending), publish, discard, load and resume. It uses the
    trainer's state (``student``, ``target``, ``optimizer``, ``lr_scheduler``, ``scaler``, ``generator``,
    ``config``, ``run_config``, the step and run counters) and its process helpers (``is_main``,
    ``_all_ranks``, ``_barrier``, ``_device``, ``_unwrapped``, ``totals``, ``log_path``)."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINTS

    def _weights_finite(self) -> bool:
        """Every trained (and EMA target) parameter finite; one device sync."""
        tensors = list(self.params)
        if self.target is not None and self.target.module is not None:
            tensors += list(self.target.module.parameters())
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())

    def _pending_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"{ckpt.PENDING_PREFIX}step_{step:07d}"

    def save_checkpoint(self, publish: bool = False) -> Path | None:
        """Write ``.pending_step_XXXXXXX`` (atomically: a temporary folder, then a rename) if every
        weight is finite on every process, else nothing (returns None). ``publish=True`` publishes it
        at once (the caller vouches for the weights); otherwise ``train_step`` publishes it after the
        next finite loss and ``run`` at its end."""
        if not self._all_ranks(self._weights_finite()):
            if self.is_main:
                print(f"[odecm] step {self.step}: non-finite weights, checkpoint not written", flush=True)
            return None
        if self._pending_step is not None and self._pending_step != self.step:
            self._discard_pending()  # superseded before it could be verified
        self._barrier()
        pending = self._pending_path(self.step)
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".tmp_step_{self.step:07d}_{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            weights = {"student": self.student_state(self._unwrapped())}
            if self.target is not None and not self.target.is_stop_gradient:
                weights["target"] = self.target.state_dict()
            meta = {"step": self.step, "run_id": self.run_id, "nonfinite": self.nonfinite, "totals": self.totals,
                    "trainer": asdict(self.config), "config": self.run_config, "run_info": self.run_info}
            state = {"optimizer": self.optimizer.state_dict(),
                     "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "rng": rng_state(self.generator)}
            ckpt.write_checkpoint(tmp, meta, state, weights)
            shutil.rmtree(pending, ignore_errors=True)
            os.replace(tmp, pending)
        self._pending_step = self.step
        self._barrier()
        if publish:
            return self._publish()
        return pending

    def _publish(self) -> Path | None:
        step, self._pending_step = self._pending_step, None
        if step is None:
            return None
        final = self.checkpoint_dir / f"step_{step:07d}"
        if self.is_main:
            final = ckpt.publish(self._pending_path(step), self.config.keep_checkpoints, self.run_id)
        self._published_step = step
        return final

    def _discard_pending(self) -> None:
        step, self._pending_step = self._pending_step, None
        if step is not None and self.is_main:
            shutil.rmtree(self._pending_path(step), ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore student, target, optimizer, scheduler, grad scaler, RNG states, step counter, run
        id and totals (no config check: ``resume`` does that)."""
        meta, state, weights = ckpt.read_state(path)
        load_tensors_into(self._unwrapped(), weights["student"])
        if self.target is not None and "target" in weights:
            self.target.load_state_dict(weights["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._apply_fresh_hyperparameters()
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.generator)
        self.step, self.nonfinite, self.run_id = int(meta["step"]), int(meta["nonfinite"]), meta["run_id"]
        totals = meta["totals"]
        self._totals = {k: totals[k] for k in ("optimizer_steps", "overflow_skips", "wall_seconds", "segments")}
        if self.is_main and self.log_path.exists():  # drop log lines past the restored step
            keep = [ln for ln in self.log_path.read_text().splitlines() if _log_line_step(ln) is not None
                    and _log_line_step(ln) <= self.step]
            # atomic: a kill during the rewrite leaves the old log, never an empty or half-written one
            write_text_atomic(self.log_path, "".join(ln + "\n" for ln in keep))

    def _apply_fresh_hyperparameters(self) -> None:
        """After loading: the optimizer settings of *this* config win over the checkpoint's (its
        optimizer and lr-scheduler states carry the old ones). ``resume`` has refused every change
        the policy forbids, so this only makes an allowed change (``--allow-change distill.optim.lr``)
        take effect. The scheduled lr is recomputed from the new base lr at the restored step."""
        import warnings

        groups = self.optimizer.param_groups
        for group, fresh in zip(groups, self._fresh_groups):
            group.update({k: v for k, v in fresh.items() if k != "lr"})
        sched = self.lr_scheduler
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [fresh.get("initial_lr", fresh["lr"]) for fresh in self._fresh_groups]
            with warnings.catch_warnings():  # get_lr() outside step() only warns; it is the closed form here
                warnings.simplefilter("ignore")
                lrs = [float(v) for v in sched.get_lr()]
            for group, lr in zip(groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs
        else:
            for group, fresh in zip(groups, self._fresh_groups):
                group["lr"] = fresh["lr"]

    def resume(self, spec: str | Path | None) -> bool:
        """``spec`` = ``"latest"`` (this run's newest published checkpoint; an error if there is none)
        or a checkpoint folder of this run. Checks the loop settings and the run config against the
        checkpoint's (``ConfigChangeError`` lists every refused difference), then loads it."""
        if spec in (None, "", False):
            return False
        path = resolve_resume(self.out_dir, spec)
        meta = ckpt.read_meta(path)
        notes = check_resume_config(meta["trainer"], asdict(self.config), TRAINER_RESUME_POLICY, self.allow_change,
                                    what="loop settings (TrainerConfig)")
        if meta.get("config") is not None or self.run_config is not None:
            run_notes = check_resume_config(meta.get("config") or {}, self.run_config or {}, self.resume_policy,
                                            self.allow_change)
            # a loop setting mirrors a run-config key (train_steps <-> distill.train_steps): note it once
            mirrored = {n.split(":", 1)[0].rsplit(".", 1)[-1] + ":" + n.split(":", 1)[1] for n in run_notes}
            notes = [n for n in notes if n not in mirrored] + run_notes
        self.resume_notes = notes
        if self.is_main:
            for note in notes:
                print(f"[odecm] resume {path.name}: changed {note}", flush=True)
        self.load_checkpoint(path)
        self.resumed_from = self._published_step = self.step
        return True

    def _start(self, resume: str | Path | None) -> None:
        """Clean up killed writes, resume or begin a fresh run (refused over another run's checkpoints)."""
        path = resolve_resume(self.out_dir, resume) if resume not in (None, "", False) else None
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for p in ckpt.remove_orphans(self.checkpoint_dir):
                print(f"[odecm] removed {p.name} (left by an interrupted checkpoint write)", flush=True)
        self._barrier()
        if path is not None:
            self.resume(resume)
            return
        published = ckpt.list_checkpoints(self.checkpoint_dir)
        if published or (self.checkpoint_dir / ckpt.LATEST).exists():
            raise RunDirError(f"out_dir={str(self.out_dir)!r} already holds checkpoints {[p.name for _, p in published]}; "
                              "pass resume='latest' to continue that run, or start in a new or empty out_dir")
        self.run_id = broadcast_hex(new_run_id(), self._device())


def _log_line_step(line: str) -> int | None:
    """The ``step`` of one ``log.jsonl`` line (0 when it has none); None for an empty line or one a kill
    cut short (not valid JSON), which a resume drops."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return int(record.get("step", 0)) if isinstance(record, dict) else None
