"""The generic distillation loop shared by the toys and SDXL.

Roles: the *student* (trained module), the *target* (``EMATarget``: an EMA copy of the student with
rate ``mu``, or the student itself under stop-gradient when ``mu = 0`` — LCM-LoRA and the paper),
and the *teacher* (frozen; lives inside the caller's ``loss_fn``).

Use::

    trainer = Trainer(student, optimizer, loss_fn, out_dir, TrainerConfig(train_steps=250, checkpoint_every=50),
                      target=target, lr_scheduler=sched, accelerator=acc,        # or accelerator=None
                      scaler=None,                # a torch.amp.GradScaler for fp16 without accelerate
                      run_config=cfg_dict,        # the run's resolved config, stored in every checkpoint
                      resume_policy=POLICY, allow_change=())   # what a resume may change (odecm.runs)
    history = trainer.run(resume=None | "latest" | "<out_dir>/checkpoints/step_0000050")
    trainer.totals                  # whole-run totals (steps, wall seconds, skips), across resumes
    trainer.finished_before_start   # True: resumed a finished run, nothing was done or written

``Trainer.train_step`` is the recipe

  1. ``terms = loss_fn(step, generator)`` under autocast (a dict holding ``"loss"`` and any
     scalars to log);
  2. loss guard, decided for all processes at once (one all-reduce): if any rank's loss is NaN/inf
     every rank skips the step;
  3. backward (through the grad scaler under fp16), unscale, clip; the gradient-norm guard is
     all-reduced too;
  4. optimizer step. Without a grad scaler a non-finite gradient skips it. With one (fp16) the step
     always goes through ``scaler.step`` + ``scaler.update``, which skip it on overflow and lower the
     loss scale: an *overflow skip*, logged and totalled but not counted as non-finite (unless more
     than ``max_consecutive_overflows`` come in a row);
  5. after a real step: lr scheduler step, target update
     ``theta_target <- mu theta_target + (1 - mu) theta_student``;
  6. non-finite skips are counted over the whole run; past ``max_nonfinite`` every rank stops with
     ``NonFiniteLossError``, the last published checkpoint intact. A step that is not a non-finite
     skip publishes the pending checkpoint: its weights just gave a finite loss and gradient;
  7. log (JSON lines, main process), checkpoint every ``checkpoint_every`` steps.

Checkpoints, their publication and the resume policy: ``odecm.trainer_checkpoints`` (the
``TrainerCheckpoints`` base of ``Trainer``).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_tensors_into, rng_state, save_tensors, set_rng_state
from .distributed import all_ranks, barrier, is_main_process
from .optim import check_optimizer, constant_with_warmup, make_optimizer
from .runs import ResumePolicy
from .target import EMATarget
from .trainer_checkpoints import TRAINER_RESUME_POLICY, TrainerCheckpoints

__all__ = [
    "EMATarget",
    "TrainerConfig",
    "Trainer",
    "NonFiniteLossError",
    "TRAINER_RESUME_POLICY",
    "latest_checkpoint",
    "save_tensors",
    "load_tensors_into",
    "make_optimizer",
    "check_optimizer",
    "constant_with_warmup",
]


class NonFiniteLossError(RuntimeError):
    """More than ``max_nonfinite`` steps had a NaN/inf loss or gradient, or the final weights give a
    non-finite loss; the last published checkpoint is intact."""


@dataclass
class TrainerConfig:
    """Loop settings. ``grad_clip=None`` disables clipping; ``checkpoint_every=0`` saves only at the
    end; ``steps=`` is the old spelling of ``train_steps`` (accepted while callers move over)."""

    train_steps: int | None = None
    grad_clip: float | None = 1.0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite: int = 10
    max_consecutive_overflows: int = 30
    seed: int = 0
    progress: bool = True
    steps: InitVar[int | None] = None

    def __post_init__(self, steps: int | None) -> None:
        if steps is not None:
            if self.train_steps is not None and self.train_steps != steps:
                raise ValueError(f"TrainerConfig: train_steps={self.train_steps} and steps={steps} disagree")
            self.train_steps = steps
        for name, low in (("train_steps", 1), ("log_every", 1), ("checkpoint_every", 0), ("keep_checkpoints", 1),
                          ("max_nonfinite", 0), ("max_consecutive_overflows", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"TrainerConfig.{name}={value!r}; allowed: an integer >= {low}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainerConfig.grad_clip={self.grad_clip!r}; allowed: > 0, or None (no clipping)")


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return None


class Trainer(TrainerCheckpoints):
    """Generic loop. ``loss_fn(step, generator) -> dict`` with a scalar tensor ``"loss"``; every other
    scalar entry (float, int, 1-element tensor) is logged. ``student_state`` selects what the
    checkpoint stores of the student (default: its full state dict; LoRA students pass the adapter
    weights). With an ``accelerate.Accelerator`` the loop uses its backward, clipping, autocast and
    grad scaler (fp16), and only the main process logs and writes; without one, ``scaler`` may be a
    ``torch.amp.GradScaler``. Under ``torch.distributed`` (with or without accelerate) every
    skip / stop decision is all-reduced, so ranks never diverge or deadlock."""

    def __init__(
        self,
        student: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[int, torch.Generator], dict[str, Any]],
        out_dir: str | Path,
        config: TrainerConfig,
        target: EMATarget | None = None,
        lr_scheduler: Any = None,
        accelerator: Any = None,
        student_state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        params: Iterable[torch.nn.Parameter] | None = None,
        run_info: dict[str, Any] | None = None,
        scaler: Any = None,
        run_config: dict[str, Any] | None = None,
        resume_policy: ResumePolicy | None = None,
        allow_change: Sequence[str] = (),
    ):
        self.student, self.optimizer, self.loss_fn = student, optimizer, loss_fn
        self.out_dir, self.config, self.target = Path(out_dir), config, target
        self.lr_scheduler, self.accelerator = lr_scheduler, accelerator
        if scaler is not None and accelerator is not None:
            raise ValueError("Trainer: pass scaler only without an accelerator (accelerate's fp16 uses accelerator.scaler)")
        self.scaler = getattr(accelerator, "scaler", None) if accelerator is not None else scaler
        if self.scaler is not None and not self.scaler.is_enabled():
            self.scaler = None
        self.student_state = student_state or (lambda m: m.state_dict())
        self.autocast = autocast or (accelerator.autocast if accelerator is not None else contextlib.nullcontext)
        self.params = [p for p in (params if params is not None else student.parameters()) if p.requires_grad]
        self.run_info = run_info or {}
        self.run_config = json.loads(json.dumps(run_config)) if run_config is not None else None
        self.resume_policy = resume_policy or ResumePolicy()
        self.allow_change = tuple(allow_change)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.nonfinite = 0
        self.run_id: str | None = None
        self.history: list[dict[str, Any]] = []
        self.resume_notes: list[str] = []
        self.resumed_from: int | None = None
        self.finished_before_start = False
        self._totals = {"optimizer_steps": 0, "overflow_skips": 0, "wall_seconds": 0.0, "segments": 0}
        self._segment_start: float | None = None
        self._consecutive_overflows = 0
        self._pending_step: int | None = None
        self._published_step: int | None = None
        # the optimizer's settings as built from this run's config (everything but the parameters)
        self._fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    # --- processes -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return is_main_process(self.accelerator)

    def _device(self) -> torch.device:
        """Where collective tensors live (NCCL needs them on the GPU)."""
        if self.accelerator is not None:
            return self.accelerator.device
        return self.params[0].device if self.params else torch.device("cpu")

    def _barrier(self) -> None:
        barrier(self.accelerator)

    def _all_ranks(self, ok: bool) -> bool:
        return all_ranks(ok, self._device())

    def _unwrapped(self) -> nn.Module:
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.student)
        return self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    @property
    def totals(self) -> dict[str, Any]:
        """Whole-run totals, across resumes: steps taken (``steps``, skipped ones included),
        ``optimizer_steps``, ``skipped_nonfinite``, ``overflow_skips``, ``wall_seconds`` spent in
        ``run`` (an earlier segment counts up to its last checkpoint) and ``segments`` (runs of
        ``run`` that trained)."""
        wall = self._totals["wall_seconds"]
        if self._segment_start is not None:
            wall += time.perf_counter() - self._segment_start
        return {"steps": self.step, "optimizer_steps": self._totals["optimizer_steps"],
                "skipped_nonfinite": self.nonfinite, "overflow_skips": self._totals["overflow_skips"],
                "wall_seconds": wall, "segments": self._totals["segments"]}

    # --- the loop ---------------------------------------------------------------------------
    def _clip(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        if self.accelerator is not None:  # unscales first under fp16
            return float(self.accelerator.clip_grad_norm_(self.params, max_norm))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _scaled_step(self) -> bool:
        """``scaler.step`` + ``scaler.update`` (accelerate's optimizer does both); False on overflow."""
        if self.accelerator is not None:
            self.optimizer.step()
            return not self.accelerator.optimizer_step_was_skipped
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return not self.scaler.get_scale() < before

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            terms = self.loss_fn(self.step, self.generator)
        loss = terms["loss"]
        record: dict[str, Any] = {"step": self.step + 1}
        grad_norm, outcome = float("nan"), "nonfinite"
        if self._all_ranks(bool(torch.isfinite(loss.detach()).all())):
            self._backward(loss)
            grad_norm = self._clip()
            if self.scaler is not None:
                outcome = "stepped" if self._scaled_step() else "overflow"
            elif self._all_ranks(math.isfinite(grad_norm)):
                self.optimizer.step()
                outcome = "stepped"
        if outcome == "stepped":
            self._consecutive_overflows = 0
            self._totals["optimizer_steps"] += 1
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            if self.target is not None:
                self.target.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if outcome == "overflow":
            self._totals["overflow_skips"] += 1
            self._consecutive_overflows += 1
            record["skipped_overflow"] = True
            if self._consecutive_overflows > self.config.max_consecutive_overflows:
                outcome = "nonfinite"  # no loss scale helps: the gradient itself is not finite
        if outcome == "nonfinite":
            self.nonfinite += 1
            record["skipped_nonfinite"] = True
        else:
            self._publish()  # the pending checkpoint's weights gave a finite loss and gradient
        self.step += 1
        record.update({k: _scalar(v) for k, v in terms.items() if _scalar(v) is not None})
        record.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                      time_s=time.perf_counter() - t0, nonfinite_total=self.nonfinite)
        if self.scaler is not None:
            record["loss_scale"] = float(self.scaler.get_scale())
        return record

    def _verify_final(self) -> bool:
        """One loss evaluation without a step (RNG states restored): is it finite on every rank?"""
        rng = rng_state(self.generator)
        with torch.no_grad(), self.autocast():
            loss = self.loss_fn(self.step, self.generator)["loss"]
        ok = self._all_ranks(bool(torch.isfinite(loss.detach()).all()))
        set_rng_state(rng, self.generator)
        return ok

    def run(self, resume: str | Path | None = None) -> list[dict[str, Any]]:
        """Train until ``config.train_steps``; ``resume="latest"`` continues this run's last checkpoint."""
        cfg = self.config
        self._start(resume)
        if self.step >= cfg.train_steps:
            self.finished_before_start = True
            if self.is_main:
                print(f"[odecm] the run in {self.out_dir} is already finished (step {self.step} of train_steps="
                      f"{cfg.train_steps}); nothing to do. Raise train_steps to continue it.", flush=True)
            return self.history
        self._totals["segments"] += 1
        self._segment_start = time.perf_counter()
        try:
            self._loop()
            self._finish()
        finally:  # freeze this segment's wall time into the totals
            self._totals["wall_seconds"] = self.totals["wall_seconds"]
            self._segment_start = None
        return self.history

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.train_steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="distill")
        while self.step < cfg.train_steps:
            record = self.train_step()
            self.history.append(record)
            skipped = record.get("skipped_nonfinite") or record.get("skipped_overflow")
            if self.is_main and (self.step % cfg.log_every == 0 or skipped):
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=record.get("loss"), nfe=record.get("target_evals"))
            if self.nonfinite > cfg.max_nonfinite:
                self._discard_pending()
                last = latest_checkpoint(self.out_dir)
                raise NonFiniteLossError(
                    f"{self.nonfinite} steps had a non-finite loss or gradient (max_nonfinite={cfg.max_nonfinite}); "
                    f"stopped at step {self.step}. Last good checkpoint: {last if last else 'none saved yet'}")
            # a step skipped as non-finite is never checkpointed: its successor publishes the last good one
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not record.get("skipped_nonfinite"):
                self.save_checkpoint()
        bar.close()

    def _finish(self) -> None:
        """Final checkpoint, published once one more loss evaluation with its weights is finite."""
        if self.step not in (self._pending_step, self._published_step):
            self.save_checkpoint()
        if self._pending_step is not None:
            if not self._verify_final():
                self._discard_pending()
                raise NonFiniteLossError(f"the weights after step {self.step} give a non-finite loss; not published. "
                                         f"Last good checkpoint: {latest_checkpoint(self.out_dir)}")
            self._publish()
        if self._published_step != self.step:
            raise NonFiniteLossError(f"the weights after step {self.step} are not finite; no final checkpoint. "
                                     f"Last good checkpoint: {latest_checkpoint(self.out_dir)}")
