"""Gaussian data N(m, v I): exact denoiser, closed-form PF-ODE flow, a per-index linear student.

For data N(m, v I) the PF-ODE in y = x / alpha, s = sigma / alpha is
``y(s') = m + (y(s) - m) sqrt((v + s'^2) / (v + s^2))`` under every schedule, and the exact denoiser
is ``x0_hat = m + v / (v + s^2) (y - m)``.
"""
from __future__ import annotations

import torch
from torch import nn

from odecm.denoisers import Denoiser, broadcast_time


class GaussianDenoiser(Denoiser):
    finite_at_zero_noise = False  # predicts x0: eps = (x - alpha x0) / sigma is undefined at sigma = 0

    def __init__(self, schedule, mean, var):
        super().__init__(schedule)
        self.mean, self.var = mean, var

    def forward(self, x, t, cond=None):
        a = broadcast_time(self.schedule.alpha(t), x)
        s = broadcast_time(self.schedule.sigma_tilde(t), x)
        return self.from_x0(x, t, self.mean + self.var / (self.var + s**2) * (x / a - self.mean))


def flow(schedule, x, t_from, t_to, mean, var):
    """Closed-form PF-ODE map from t_from to t_to (per-sample or scalar times)."""
    t_from = torch.as_tensor(t_from, dtype=x.dtype)
    t_to = torch.as_tensor(t_to, dtype=x.dtype)
    s0 = broadcast_time(schedule.sigma_tilde(t_from), x)
    s1 = broadcast_time(schedule.sigma_tilde(t_to), x)
    a0 = broadcast_time(schedule.alpha(t_from), x)
    a1 = broadcast_time(schedule.alpha(t_to), x)
    y1 = mean + (x / a0 - mean) * torch.sqrt((var + s1**2) / (var + s0**2))
    return a1 * y1


class LinearPerIndexStudent(Denoiser):
    """x0_hat(x, t_n) = a_n x + b_n with one (a_n, b_n) pair of vectors per grid point."""

    def __init__(self, schedule, grid, dim):
        super().__init__(schedule)
        self.grid = grid
        self.a = nn.Parameter(torch.zeros(grid.numel(), dim, dtype=grid.dtype))
        self.b = nn.Parameter(torch.zeros(grid.numel(), dim, dtype=grid.dtype))

    def index(self, t):
        return torch.searchsorted(self.grid.to(t.dtype), t.contiguous())

    def forward(self, x, t, cond=None):
        n = self.index(t)
        return self.from_x0(x, t, self.a[n] * x + self.b[n])
