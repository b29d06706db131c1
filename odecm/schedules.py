"""Noise schedules: ``x_t = alpha(t) x_0 + sigma(t) eps``; the continuous ones, and the registry of all.

The interface (``alpha``, ``sigma``, their derivatives, ``sigma_tilde``, ``log_snr``, the forward
SDE) is ``odecm.schedule_base.NoiseSchedule``; the discrete DDPM-family schedule (SDXL's) and its
timestep conventions are ``odecm.discrete_schedule``. Every name is importable from here.

Time conventions
----------------
Continuous schedules take ``t`` in ``[t_min, t_max]`` (``EDM`` uses ``t = sigma``); ``DiscreteSchedule``
takes the model's integer timestep.
"""
from __future__ import annotations

import math

import torch

from .discrete_schedule import BETA_SCHEDULES, DiscreteSchedule, diffusers_betas, sdxl_schedule
from .schedule_base import NoiseSchedule, _as_tensor

Tensor = torch.Tensor

__all__ = [
    "NoiseSchedule",
    "VPLinear",
    "VPCosine",
    "VE",
    "EDM",
    "DiscreteSchedule",
    "diffusers_betas",
    "BETA_SCHEDULES",
    "sdxl_schedule",
    "make_schedule",
    "SCHEDULES",
]


class VPLinear(NoiseSchedule):
    """Variance-preserving SDE with linear ``beta(t) = beta_min + t (beta_max - beta_min)``, t in [0, 1].

    ``alpha = exp(-B(t)/2)`` with ``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``,
    ``sigma = sqrt(1 - alpha^2)``. Clean data at ``t = 0``.
    """

    t_clean = 0.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min, self.beta_max, self.t_min, self.t_max = beta_min, beta_max, t_min, t_max

    def _int_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.exp(-0.5 * self._int_beta(t))

    def sigma(self, t):
        t = _as_tensor(t)
        return torch.sqrt(-torch.expm1(-self._int_beta(t)))

    def d_alpha(self, t):
        t = _as_tensor(t)
        return -0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t):
        t = _as_tensor(t)
        # d/dt sqrt(1 - e^{-B}) = beta e^{-B} / (2 sigma)
        return 0.5 * self._beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def t_from_sigma_tilde(self, s):
        s = _as_tensor(s)
        # B(t) = log(1 + s^2); solve beta_min t + (d/2) t^2 = B for t >= 0
        big_b = torch.log1p(s**2)
        d = self.beta_max - self.beta_min
        if d == 0:
            return big_b / self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * big_b)) / d


class VPCosine(NoiseSchedule):
    """VP cosine schedule (Nichol & Dhariwal): ``alpha(t) = cos(pi/2 (t + s0)/(1 + s0)) / cos(pi/2 s0/(1 + s0))``,
    ``sigma = sqrt(1 - alpha^2)``, t in [0, t_max] with t_max < 1 (alpha(1) = 0)."""

    t_clean = 0.0

    def __init__(self, s0: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s0, self.t_min, self.t_max = s0, t_min, t_max
        self._c0 = math.cos(0.5 * math.pi * s0 / (1.0 + s0))

    def _phase(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * (t + self.s0) / (1.0 + self.s0)

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.cos(self._phase(t)) / self._c0

    def sigma(self, t):
        t = _as_tensor(t)
        return torch.sqrt(torch.clamp(1.0 - self.alpha(t) ** 2, min=0.0))

    def d_alpha(self, t):
        t = _as_tensor(t)
        return -torch.sin(self._phase(t)) * (0.5 * math.pi / (1.0 + self.s0)) / self._c0

    def d_sigma(self, t):
        t = _as_tensor(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_sigma_tilde(self, s):
        s = _as_tensor(s)
        a = torch.rsqrt(1.0 + s**2)
        return torch.acos(torch.clamp(a * self._c0, -1.0, 1.0)) * (1.0 + self.s0) / (0.5 * math.pi) - self.s0


class VE(NoiseSchedule):
    """Variance-exploding SDE (Song et al.): ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``,
    t in [0, 1]. It never reaches sigma = 0 (``t_clean`` is None)."""

    t_clean = None

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0, t_max: float = 1.0):
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = sigma_min, sigma_max, t_min, t_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.ones_like(t)

    def sigma(self, t):
        t = _as_tensor(t)
        return self.sigma_min * torch.exp(self._log_ratio * t)

    def d_alpha(self, t):
        t = _as_tensor(t)
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return self._log_ratio * self.sigma(t)

    def t_from_sigma_tilde(self, s):
        s = _as_tensor(s)
        return torch.log(s / self.sigma_min) / self._log_ratio


class EDM(NoiseSchedule):
    """EDM / Karras: ``alpha = 1``, ``sigma(t) = t``; t in [sigma_min, sigma_max], clean data at t = 0."""

    t_clean = 0.0

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha(self, t):
        t = _as_tensor(t)
        return torch.ones_like(t)

    def sigma(self, t):
        return _as_tensor(t).clone()

    def d_alpha(self, t):
        return torch.zeros_like(_as_tensor(t))

    def d_sigma(self, t):
        return torch.ones_like(_as_tensor(t))

    def t_from_sigma_tilde(self, s):
        return _as_tensor(s).clone()


SCHEDULES = {
    "vp": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "discrete": DiscreteSchedule,
    "sdxl": sdxl_schedule,
}


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: one of ``SCHEDULES`` (vp, vp_cosine, ve, edm, discrete, sdxl)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
