"""Time grids ``t_0 < t_1 < ... < t_N`` (ascending; index 0 is the data end).

* ``uniform``: equal steps in t between ``t_start`` and ``t_end``;
* ``karras``: EDM's ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` in the
  schedule's sigma_tilde, mapped back to t;
* ``skip``: the discrete grid of LCM's DDIM solver and of the paper: ``t_n = n T/N - 1 + offset``
  for n = 1..N and ``t_0 = 0`` (diffusers indexing, N = 100: 0, 9, 19, ..., 999; the paper's
  indexing: 0, 10, ..., 1000);
* ``leading``: diffusers' "leading" spacing with ``steps_offset`` (SDXL's inference schedulers):
  ``t_n = (n - 1) (T // N) + steps_offset + offset`` for n = 1..N, and ``t_0`` = ``offset`` (DDIM with
  ``set_alpha_to_one=False`` ends at alphas_cumprod[0]) or the clean point (Euler / Heun end at sigma 0).
  With the paper's indexing (offset 1) every point is diffusers' timestep + 1: the same noise levels.
"""
from __future__ import annotations

from typing import Literal

import torch

from .schedules import DiscreteSchedule, NoiseSchedule

Tensor = torch.Tensor

__all__ = ["uniform", "karras", "skip", "leading", "make_grid", "GRIDS"]


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"num_steps={n!r}; allowed: an integer >= 1")


def uniform(schedule: NoiseSchedule, num_steps: int, t_start: float | None = None, t_end: float | None = None,
            dtype: torch.dtype = torch.float64) -> Tensor:
    """N + 1 equally spaced times from ``t_start`` (default ``t_min``) to ``t_end`` (default ``t_max``)."""
    _check_n(num_steps)
    a = schedule.t_min if t_start is None else t_start
    b = schedule.t_max if t_end is None else t_end
    return torch.linspace(a, b, num_steps + 1, dtype=dtype)


def karras(schedule: NoiseSchedule, num_steps: int, rho: float = 7.0, t_start: float | None = None,
           t_end: float | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Karras et al. (2022) spacing in sigma_tilde between the noise levels of ``t_start`` and ``t_end``."""
    _check_n(num_steps)
    a = schedule.t_min if t_start is None else t_start
    b = schedule.t_max if t_end is None else t_end
    s_lo = float(schedule.sigma_tilde(torch.tensor(a, dtype=torch.float64)))
    s_hi = float(schedule.sigma_tilde(torch.tensor(b, dtype=torch.float64)))
    ramp = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    s = (s_lo ** (1 / rho) + ramp * (s_hi ** (1 / rho) - s_lo ** (1 / rho))) ** rho
    t = schedule.t_from_sigma_tilde(s)
    t[0], t[-1] = a, b  # exact end points
    return t.to(dtype)


def _discrete(schedule: NoiseSchedule) -> DiscreteSchedule:
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"this grid needs a DiscreteSchedule, got {type(schedule).__name__}")
    return schedule


def skip(schedule: NoiseSchedule, num_steps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """LCM / paper skip grid: ``[0, T/N - 1 + off, 2T/N - 1 + off, ..., T - 1 + off]`` (N + 1 points).

    ``T / N`` must be an integer (N = 100 or 50 over 1000 training steps)."""
    sch = _discrete(schedule)
    _check_n(num_steps)
    T = sch.num_train_timesteps
    if T % num_steps:
        raise ValueError(f"num_steps={num_steps} must divide num_train_timesteps={T}")
    ratio = T // num_steps
    n = torch.arange(1, num_steps + 1, dtype=dtype)
    inner = n * ratio - 1 + sch.timestep_offset
    return torch.cat([torch.zeros(1, dtype=dtype), inner])


def leading(schedule: NoiseSchedule, num_steps: int, steps_offset: int = 1,
            final: Literal["first", "clean"] = "first", dtype: torch.dtype = torch.float64) -> Tensor:
    """diffusers' ``timestep_spacing="leading"`` grid (DDIM / Euler / Heun with SDXL's config)."""
    sch = _discrete(schedule)
    _check_n(num_steps)
    if final not in ("first", "clean"):
        raise ValueError(f"final={final!r}; allowed: 'first', 'clean'")
    ratio = sch.num_train_timesteps // num_steps
    # diffusers' timesteps (diffusers indexing), shifted by timestep_offset into the schedule's indexing
    inner = torch.arange(num_steps, dtype=dtype) * ratio + steps_offset + sch.timestep_offset
    t0 = float(sch.timestep_offset) if final == "first" else sch.t_clean
    return torch.cat([torch.tensor([t0], dtype=dtype), inner])


GRIDS = {"uniform": uniform, "karras": karras, "skip": skip, "leading": leading}


def make_grid(name: str, schedule: NoiseSchedule, num_steps: int, **kwargs) -> Tensor:
    """Build a grid by name: one of ``GRIDS`` (uniform, karras, skip, leading)."""
    if name not in GRIDS:
        raise ValueError(f"grid={name!r} is unknown; allowed: {sorted(GRIDS)}")
    return GRIDS[name](schedule, num_steps, **kwargs)
