"""Consistency functions: ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` with ``f(x, t_min) = x``.

Two boundary parameterisations:

* ``LCMBoundary`` (Luo et al., LCM; the paper's choice) on the discrete timestep ``t``:
  ``c_skip = sd^2 / ((k t)^2 + sd^2)``, ``c_out = k t / sqrt((k t)^2 + sd^2)`` with
  ``sd = sigma_data = 0.5`` and timestep scaling ``k = 10``. Exact at ``t = 0``. (In the paper's
  indexing, where ``t = 0`` is clean data, the boundary sits at the clean point.)
* ``EDMBoundary`` (Song et al., consistency models) on the noise level ``sigma = s(t)``:
  ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
  ``c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2)``, with ``sigma_min = s(t_min)``.

Both give ``c_skip = 1`` and ``c_out = 0`` exactly at the boundary time, so ``f(x, t_min) == x``
bitwise.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .denoisers import Denoiser, batch_time, broadcast_time
from .schedules import NoiseSchedule

Tensor = torch.Tensor

__all__ = ["Boundary", "LCMBoundary", "EDMBoundary", "ConsistencyFunction", "make_boundary", "BOUNDARIES"]


class Boundary:
    """``scalings(t) -> (c_skip, c_out)`` for per-sample times ``t``; ``t_min`` is where f = identity."""

    t_min: float

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class LCMBoundary(Boundary):
    def __init__(self, sigma_data: float = 0.5, timestep_scaling: float = 10.0, t_min: float = 0.0):
        self.sigma_data, self.timestep_scaling, self.t_min = sigma_data, timestep_scaling, t_min

    def scalings(self, t):
        scaled = (t - self.t_min) * self.timestep_scaling
        sd2 = self.sigma_data**2
        c_skip = sd2 / (scaled**2 + sd2)
        c_out = scaled / torch.sqrt(scaled**2 + sd2)
        return c_skip, c_out

    def __repr__(self):
        return f"LCMBoundary(sigma_data={self.sigma_data}, timestep_scaling={self.timestep_scaling}, t_min={self.t_min})"


class EDMBoundary(Boundary):
    def __init__(self, schedule: NoiseSchedule, t_min: float | None = None, sigma_data: float = 0.5):
        self.schedule, self.sigma_data = schedule, sigma_data
        self.t_min = schedule.t_min if t_min is None else t_min

    def scalings(self, t):
        sigma = self.schedule.sigma_tilde(t)
        sigma_min = self.schedule.sigma_tilde(torch.full_like(t, self.t_min))
        sd = self.sigma_data
        c_skip = sd**2 / ((sigma - sigma_min) ** 2 + sd**2)
        c_out = sd * (sigma - sigma_min) / torch.sqrt(sd**2 + sigma**2)
        return c_skip, c_out

    def __repr__(self):
        return f"EDMBoundary(sigma_data={self.sigma_data}, t_min={self.t_min})"


BOUNDARIES = {"lcm": LCMBoundary, "edm": EDMBoundary}


def make_boundary(name: str, schedule: NoiseSchedule, t_min: float | None = None, **kwargs) -> Boundary:
    """``"lcm"`` or ``"edm"``; ``t_min`` defaults to the grid's first point 0 (lcm) or ``schedule.t_min`` (edm)."""
    if name == "lcm":
        return LCMBoundary(t_min=0.0 if t_min is None else t_min, **kwargs)
    if name == "edm":
        return EDMBoundary(schedule, t_min=t_min, **kwargs)
    raise ValueError(f"boundary={name!r} is unknown; allowed: {sorted(BOUNDARIES)}")


class ConsistencyFunction(nn.Module):
    """``f(x, t, cond) = c_skip(t) x + c_out(t) x0_hat(x, t, cond)`` around a denoiser (the student)."""

    def __init__(self, denoiser: Denoiser, boundary: Boundary):
        super().__init__()
        self.denoiser = denoiser
        self.boundary = boundary

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def forward(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        t = batch_time(t, x)
        c_skip, c_out = self.boundary.scalings(t.to(torch.float64) if x.dtype == torch.float64 else t.float())
        x0 = self.denoiser(x, t, cond).x0
        return broadcast_time(c_skip, x) * x + broadcast_time(c_out, x) * x0
