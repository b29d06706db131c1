"""The target network of consistency distillation: an EMA copy of the student, or the student
itself under stop-gradient (EMA rate 0, LCM-LoRA and the paper)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .checkpoint import load_tensors_into

__all__ = ["EMATarget"]


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
