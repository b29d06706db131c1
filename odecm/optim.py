"""Optimizers and learning-rate schedules by name: ``adam``, ``adamw``, ``sgd`` (torch) and
``adamw8bit`` (bitsandbytes' 8-bit AdamW, which runs on CPU and CUDA).

Call ``check_optimizer(name, key)`` while validating a config, before any model loads: a missing
bitsandbytes is reported there, naming the config key and the install command.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .config import ConfigError

__all__ = ["OPTIMIZER_NAMES", "MissingPackageError", "check_optimizer", "make_optimizer", "constant_with_warmup",
           "warmup_then"]

OPTIMIZER_NAMES = ("adam", "adamw", "adamw8bit", "sgd")


class MissingPackageError(ConfigError, ImportError):
    """A config names something whose package is not installed."""


def check_optimizer(name: str, key: str = "distill.optim.name") -> None:
    """Raise (naming ``key``) for an unknown optimizer name or a missing bitsandbytes."""
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"{key}={name!r} is not allowed; allowed values: {list(OPTIMIZER_NAMES)}")
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise MissingPackageError(
                f"{key}='adamw8bit' needs bitsandbytes, which is not installed (it runs on CPU and CUDA): "
                f"pip install bitsandbytes; or set {key}='adamw' ({exc})") from None


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-4,
                   betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
                   key: str = "distill.optim.name", **_: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` over the parameters that require grad (``key`` names the config key in errors)."""
    check_optimizer(name, key)
    params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_then(schedule: str, warmup_steps: int, train_steps: int) -> Callable[[int], float]:
    """The lr factor of step ``s`` (0-based): ``(s + 1) / warmup_steps`` during the warm-up, then 1
    (``schedule="constant"``) or ``(1 + cos(pi p)) / 2`` with ``p = (s - warmup) / (train_steps - warmup)``
    clipped to 1 (``"cosine"``). For ``torch.optim.lr_scheduler.LambdaLR``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule {schedule!r}; allowed: 'constant', 'cosine'")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, train_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant (the paper: constant lr 1e-4)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then("constant", warmup_steps, 0))
