"""Distances ``d(a, b) -> (B,)`` of the consistency loss, per sample: L2 (the paper's), L1, pseudo-Huber.

``get_distance`` also accepts any callable ``(a, b) -> (B,)`` (the hook for LPIPS). Used by
``odecm.objectives.consistency_loss``; every name is re-exported there.
"""
from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor

__all__ = ["l2_distance", "l1_distance", "pseudo_huber_distance", "DISTANCES", "get_distance"]


def _flat(d: Tensor) -> Tensor:
    return d.reshape(d.shape[0], -1)


def _diff(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` in at least float32 (losses are fp32 even when the networks run in bf16)."""
    d = a - b
    return d.float() if d.dtype in (torch.float16, torch.bfloat16) else d


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per sample: ``mean_i (a_i - b_i)^2`` (the paper's plain L2 / MSE)."""
    return _flat(_diff(a, b) ** 2).mean(dim=1)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute error per sample."""
    return _flat(_diff(a, b).abs()).mean(dim=1)


def pseudo_huber_distance(a: Tensor, b: Tensor, c: float = 0.001) -> Tensor:
    """``sqrt(||a - b||^2 / D + c^2) - c`` per sample (Song & Dhariwal 2023, with the squared norm
    normalised by the dimension D so that ``c`` is per-element, as LCM's ``huber_c``)."""
    return torch.sqrt(_flat(_diff(a, b) ** 2).mean(dim=1) + c * c) - c


DISTANCES: dict[str, Callable[..., Tensor]] = {"l2": l2_distance, "l1": l1_distance, "pseudo_huber": pseudo_huber_distance}


def get_distance(name: str | Callable, **kwargs) -> Callable[[Tensor, Tensor], Tensor]:
    """A named distance (l2, l1, pseudo_huber with ``c``) or any callable ``(a, b) -> (B,)`` —
    the hook for perceptual distances such as LPIPS."""
    if callable(name):
        return name
    if name not in DISTANCES:
        raise ValueError(f"distance={name!r} is unknown; allowed: {sorted(DISTANCES)} or a callable")
    fn = DISTANCES[name]
    if kwargs:
        return lambda a, b: fn(a, b, **kwargs)
    return fn
