"""The generic distillation loop shared by the toys and SDXL.

Roles: the *student* (trained module), the *target* (``EMATarget``: an EMA copy of the student with
rate ``mu``, or the student itself under stop-gradient when ``mu = 0`` — LCM-LoRA and the paper),
and the *teacher* (frozen; lives inside the caller's ``loss_fn``).

``Trainer.run`` repeats the recipe

  1. ``terms = loss_fn(step, generator)`` (a dict holding ``"loss"`` and any scalars to log);
  2. guard: a non-finite loss or gradient norm skips the step (counted; past ``max_nonfinite``
     skipped steps the run stops with ``NonFiniteLossError``, the last good checkpoint intact);
  3. backward, gradient clipping, optimizer and scheduler step;
  4. target update ``theta_target <- mu theta_target + (1 - mu) theta_student``;
  5. log (JSON lines), checkpoint every K steps (atomic: written to a temporary folder, then
     renamed, then the ``latest`` pointer replaced).

Checkpoints hold the student's (and target's) tensors as safetensors, and the optimizer,
scheduler, step, skip counter and every RNG state (torch CPU/CUDA, the loop's generator, Python,
NumPy) in ``state.pt``, so a resumed run continues bitwise where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "EMATarget",
    "TrainerConfig",
    "Trainer",
    "NonFiniteLossError",
    "latest_checkpoint",
    "save_tensors",
    "load_tensors_into",
    "make_optimizer",
    "constant_with_warmup",
]


class NonFiniteLossError(RuntimeError):
    """Raised when more than ``max_nonfinite`` steps had a NaN/inf loss or gradient."""


class EMATarget:
    """Target network policy.

    ``rate > 0``: a frozen deep copy updated as ``p_target <- rate p_target + (1 - rate) p_student``.
    ``rate == 0``: no copy — the target *is* the online student, called under ``torch.no_grad()``
    (stop-gradient); numerically identical to an EMA with rate 0, without the memory.
    ``params`` restricts the EMA to a subset of parameter names (e.g. LoRA weights only);
    ``copy_fn`` makes the target copy (default ``copy.deepcopy``; a LoRA student can share its
    frozen base weights with the copy instead of duplicating them).
    """

    def __init__(self, student: nn.Module, rate: float, params: Callable[[str], bool] | None = None,
                 copy_fn: Callable[[nn.Module], nn.Module] = copy.deepcopy):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"target.ema_rate={rate!r}; allowed: 0 <= rate < 1 (0 = stop-gradient)")
        self.rate = float(rate)
        self.student = student
        self.select = params or (lambda name: True)
        self.module: nn.Module | None = None
        if self.rate > 0:
            self.module = copy_fn(student)
            self.module.requires_grad_(False)

    @property
    def is_stop_gradient(self) -> bool:
        return self.module is None

    @property
    def network(self) -> nn.Module:
        """The module to evaluate as the target (call it under no_grad)."""
        return self.student if self.module is None else self.module

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.network(*args, **kwargs)

    @torch.no_grad()
    def update(self) -> None:
        if self.module is None:
            return
        src = dict(self.student.named_parameters())
        for name, p in self.module.named_parameters():
            if name in src and self.select(name):
                p.lerp_(src[name].detach().to(p.dtype), 1.0 - self.rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.module is None:
            return {}
        return {k: v for k, v in self.module.state_dict().items() if self.select(k)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if self.module is not None and sd:
            load_tensors_into(self.module, sd)


@dataclass
class TrainerConfig:
    """Loop settings. ``grad_clip=None`` disables clipping; ``checkpoint_every=0`` saves only at the end."""

    steps: int
    grad_clip: float | None = 1.0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_nonfinite: int = 10
    seed: int = 0
    progress: bool = True


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of contiguous CPU clones (shared storage is not allowed by the format)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors_into(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a (possibly partial, e.g. LoRA-only) state dict; unknown keys are an error."""
    result = module.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"checkpoint has keys the module lacks: {result.unexpected_keys[:5]} ...")


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The folder named by ``<out_dir>/checkpoints/latest``, or None."""
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = Path(out_dir) / "checkpoints" / pointer.read_text().strip()
    return path if path.exists() else None


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return None


class Trainer:
    """Generic loop. ``loss_fn(step, generator) -> dict`` with a scalar tensor ``"loss"``; every other
    scalar entry (float, int, 1-element tensor) is logged. ``student_state`` selects what the
    checkpoint stores of the student (default: its full state dict; LoRA students pass the adapter
    weights). With an ``accelerate.Accelerator`` the loop uses its backward, clipping and autocast,
    and only the main process logs and saves."""

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
    ):
        self.student, self.optimizer, self.loss_fn = student, optimizer, loss_fn
        self.out_dir, self.config, self.target = Path(out_dir), config, target
        self.lr_scheduler, self.accelerator = lr_scheduler, accelerator
        self.student_state = student_state or (lambda m: m.state_dict())
        self.autocast = autocast or (accelerator.autocast if accelerator is not None else contextlib.nullcontext)
        self.params = [p for p in (params if params is not None else student.parameters()) if p.requires_grad]
        self.run_info = run_info or {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.nonfinite = 0
        self.history: list[dict[str, Any]] = []

    # --- helpers ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.jsonl"

    # --- checkpointing ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXX`` atomically and point ``latest`` at it."""
        ckdir = self.out_dir / "checkpoints"
        final = ckdir / f"step_{self.step:07d}"
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if self.is_main:
            ckdir.mkdir(parents=True, exist_ok=True)
            tmp = ckdir / f".tmp_{final.name}_{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_tensors(self.student_state(self._unwrapped()), tmp / "student.safetensors")
            if self.target is not None and not self.target.is_stop_gradient:
                save_tensors(self.target.state_dict(), tmp / "target.safetensors")
            state = {
                "step": self.step,
                "nonfinite": self.nonfinite,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "rng": _rng_state(self.generator),
                "run_info": self.run_info,
            }
            torch.save(state, tmp / "state.pt")
            (tmp / "COMPLETE").write_text(str(self.step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = ckdir / f".latest_{os.getpid()}"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, ckdir / "latest")
            self._prune(ckdir)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return final

    def _prune(self, ckdir: Path) -> None:
        done = sorted(p for p in ckdir.glob("step_*") if (p / "COMPLETE").exists())
        for old in done[: max(0, len(done) - self.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore student, target, optimizer, scheduler, RNG states and the step counter."""
        path = Path(path)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        load_tensors_into(self._unwrapped(), load_file(str(path / "student.safetensors")))
        if self.target is not None and (path / "target.safetensors").exists():
            self.target.load_state_dict(load_file(str(path / "target.safetensors")))
        state = torch.load(path / "state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        _set_rng_state(state["rng"], self.generator)
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
        if self.is_main and self.log_path.exists():  # drop log lines past the restored step
            keep = [ln for ln in self.log_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= self.step]
            self.log_path.write_text("".join(ln + "\n" for ln in keep))

    def resume(self, spec: str | Path | None) -> bool:
        """``spec`` = ``"latest"`` (this run's newest checkpoint, if any) or a checkpoint folder."""
        if spec in (None, "", False):
            return False
        path = latest_checkpoint(self.out_dir) if spec == "latest" else Path(spec)
        if path is None:
            return False
        self.load_checkpoint(path)
        return True

    # --- the loop ---------------------------------------------------------------------------
    def _clip(self) -> float:
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            terms = self.loss_fn(self.step, self.generator)
        loss = terms["loss"]
        record: dict[str, Any] = {"step": self.step + 1}
        finite = bool(torch.isfinite(loss.detach()).all())
        grad_norm = float("nan")
        if finite:
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            grad_norm = self._clip()
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            if self.target is not None:
                self.target.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite += 1
            record["skipped_nonfinite"] = True
        self.step += 1
        record.update({k: _scalar(v) for k, v in terms.items() if _scalar(v) is not None})
        record.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                      time_s=time.perf_counter() - t0, nonfinite_total=self.nonfinite)
        return record

    def run(self, resume: str | Path | None = None) -> list[dict[str, Any]]:
        """Train until ``config.steps``; ``resume="latest"`` continues this run's last checkpoint."""
        from tqdm.auto import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume(resume)
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="distill")
        while self.step < cfg.steps:
            record = self.train_step()
            self.history.append(record)
            if self.is_main and (self.step % cfg.log_every == 0 or record.get("skipped_nonfinite")):
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=record.get("loss"), nfe=record.get("target_evals"))
            if self.nonfinite > cfg.max_nonfinite:
                last = latest_checkpoint(self.out_dir)
                raise NonFiniteLossError(
                    f"{self.nonfinite} steps had a non-finite loss or gradient (max_nonfinite={cfg.max_nonfinite}); "
                    f"stopped at step {self.step}. Last good checkpoint: {last if last else 'none saved yet'}"
                )
            # a skipped (non-finite) step is never checkpointed: the last checkpoint stays the last good one
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not record.get("skipped_nonfinite"):
                self.save_checkpoint()
        bar.close()
        if latest_checkpoint(self.out_dir) is None or latest_checkpoint(self.out_dir).name != f"step_{self.step:07d}":
            self.save_checkpoint()
        return self.history


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-4,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
                   **_: Any) -> torch.optim.Optimizer:
    """``adam``, ``adamw``, ``sgd`` (torch) or ``adamw8bit`` (bitsandbytes, when installed)."""
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore
        except ImportError as exc:
            raise ImportError(
                "optim.name='adamw8bit' needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                "use optim.name='adamw' otherwise"
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optim.name={name!r}; allowed: 'adam', 'adamw', 'adamw8bit', 'sgd'")


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant (the paper: constant lr 1e-4)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
