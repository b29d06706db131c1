"""The discrete (DDPM-family, diffusers-table) schedule ``DiscreteSchedule``, its betas and ``sdxl_schedule``.

``DiscreteSchedule`` (SDXL's among them) takes the **model's integer timestep** as its time. Its
noise levels are ``alphas_cumprod[t - timestep_offset]``:

* ``timestep_offset=0`` (default, diffusers): the UNet sees 0..T-1 and timestep ``k`` has noise
  level ``alphas_cumprod[k]``; clean data sits at ``t = -1``;
* ``timestep_offset=1`` (the paper's code): the UNet sees 1..T and timestep ``k`` has noise level
  ``alphas_cumprod[k - 1]``; clean data sits at ``t = 0``.

``t_clean = timestep_offset - 1`` is where ``sigma = 0``. Between integer timesteps (and between
``t_clean`` and the first timestep) ``sigma_tilde`` is linearly interpolated, as diffusers'
Euler scheduler does; at integers ``alpha^2`` equals ``alphas_cumprod`` (to float64 rounding).
The tables are diffusers' own float32 ``betas`` and ``alphas_cumprod``, cast to float64.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from .schedule_base import NoiseSchedule, _as_tensor

Tensor = torch.Tensor

__all__ = ["DiscreteSchedule", "diffusers_betas", "BETA_SCHEDULES", "sdxl_schedule"]


BetaScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def diffusers_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                    beta_schedule: BetaScheduleName = "scaled_linear", trained_betas=None) -> Tensor:
    """The float32 ``betas`` a diffusers DDPM-family scheduler holds for these config fields.

    Computed the way diffusers computes them (so the values agree bitwise): ``trained_betas`` ->
    ``tensor(trained_betas, float32)``; ``linear`` -> ``linspace(beta_start, beta_end, T, float32)``;
    ``scaled_linear`` -> ``linspace(sqrt(beta_start), sqrt(beta_end), T, float32)^2``;
    ``squaredcos_cap_v2`` -> ``min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` in Python floats with
    ``abar(u) = cos((u + 0.008) / 1.008 pi/2)^2``, then rounded to float32."""
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"trained_betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("trained_betas must lie in (0, 1)")
        return betas
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; allowed: {list(BETA_SCHEDULES)}"
                         " (or trained_betas)")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)


class DiscreteSchedule(NoiseSchedule):
    """DDPM-family schedule: a table ``alphas_cumprod[k]``, k = 0..T-1, indexed by the model's timestep.

    Built from the fields of a diffusers scheduler config (``beta_schedule`` linear, scaled_linear
    (SD / SDXL), squaredcos_cap_v2, or ``trained_betas``), a schedule holds **exactly** the tables
    diffusers' scheduler holds: float32 ``betas`` (``diffusers_betas``) and the float32
    ``alphas_cumprod = cumprod(1 - betas)``, both cast to float64 (``betas``, ``alphas_cumprod``).
    ``from_alphas_cumprod(table)`` takes any table instead (then ``betas = 1 - a_k / a_{k-1}``, float64).

    Time is the model's timestep; see the module docstring for ``timestep_offset`` (0 = diffusers,
    1 = the paper's code) and the interpolation between integers.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: BetaScheduleName = "scaled_linear",
        timestep_offset: int = 0,
        trained_betas=None,
    ):
        betas32 = diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        alphas_cumprod32 = torch.cumprod(1.0 - betas32, dim=0)  # float32, as diffusers
        self.beta_start, self.beta_end = beta_start, beta_end
        self.beta_schedule = "trained_betas" if trained_betas is not None else beta_schedule
        self._set_tables(betas32.double(), alphas_cumprod32.double(), timestep_offset)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, timestep_offset: int = 0) -> "DiscreteSchedule":
        """A schedule with the given ``alphas_cumprod`` table (strictly decreasing, in (0, 1]),
        held in float64 exactly as given; ``betas = 1 - a_k / a_{k-1}`` (``a_{-1} = 1``)."""
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
        if ac.numel() < 2 or not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac.diff() < 0).all()):
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-D table of at least 2 values in (0, 1]")
        betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self = cls.__new__(cls)
        self.beta_start = self.beta_end = None
        self.beta_schedule = "alphas_cumprod"
        self._set_tables(betas, ac, timestep_offset)
        return self

    @classmethod
    def from_scheduler_config(cls, config: dict, timestep_offset: int = 0) -> "DiscreteSchedule":
        """From a diffusers scheduler config dict (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``, ``trained_betas``; diffusers' defaults 1000, 0.0001, 0.02, linear).
        ``rescale_betas_zero_snr=True`` is rejected (alphas_cumprod[-1] = 0 has no finite noise level)."""
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True is not supported (zero terminal SNR); allowed: False")
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("beta_start", 0.0001)),
                   float(config.get("beta_end", 0.02)), config.get("beta_schedule", "linear"),
                   timestep_offset=timestep_offset, trained_betas=config.get("trained_betas"))

    def _set_tables(self, betas: Tensor, alphas_cumprod: Tensor, timestep_offset: int) -> None:
        if timestep_offset not in (0, 1):
            raise ValueError(f"timestep_offset={timestep_offset!r}; allowed: 0 (diffusers) or 1 (paper's code)")
        self.num_train_timesteps = T = int(alphas_cumprod.numel())
        self.timestep_offset = timestep_offset
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # the paper's VP tables: sigma_k = sqrt(1 - alphas_cumprod[k]), beta rate T * betas[k]
        self.vp_sigmas = torch.sqrt(1.0 - alphas_cumprod)
        self.vp_betas = betas * T
        # sigma_tilde table with the clean point (s = 0) prepended: entry j <-> timestep t_clean + j
        s_tab = torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        self._s_table = torch.cat([torch.zeros(1, dtype=torch.float64), s_tab])
        self.t_clean = float(timestep_offset - 1)
        self.t_min = float(timestep_offset)
        self.t_max = float(timestep_offset + T - 1)

    def table_at(self, table: Tensor, t: Tensor) -> Tensor:
        """A per-timestep table (entry k <-> timestep ``k + timestep_offset``) at times ``t`` (float64):
        linear interpolation in t, which is the table itself at integer timesteps; times below
        ``t_min`` (the clean point among them) read entry 0, times above ``t_max`` the last entry."""
        t = _as_tensor(t)
        tab = table.to(device=t.device, dtype=torch.float64)
        pos = (t.to(torch.float64) - self.timestep_offset).clamp(0, tab.numel() - 1)
        lo = pos.floor().long().clamp(max=tab.numel() - 2)
        frac = pos - lo.to(pos.dtype)
        return tab[lo] * (1 - frac) + tab[lo + 1] * frac

    def _table_pos(self, t: Tensor) -> Tensor:
        return t - self.t_clean

    def sigma_tilde(self, t):
        t = _as_tensor(t)
        tab = self._s_table.to(device=t.device)
        pos = self._table_pos(t.to(torch.float64)).clamp(0, tab.numel() - 1)
        lo = pos.floor().long().clamp(max=tab.numel() - 2)
        frac = pos - lo.to(pos.dtype)
        s = tab[lo] * (1 - frac) + tab[lo + 1] * frac
        return s.to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def _ds_dt(self, t: Tensor) -> Tensor:
        tab = self._s_table.to(device=t.device)
        pos = self._table_pos(t.to(torch.float64)).clamp(0, tab.numel() - 1)
        lo = pos.floor().long().clamp(max=tab.numel() - 2)
        return (tab[lo + 1] - tab[lo]).to(t.dtype if t.is_floating_point() else torch.get_default_dtype())

    def alpha(self, t):
        return torch.rsqrt(1.0 + self.sigma_tilde(t) ** 2)

    def sigma(self, t):
        s = self.sigma_tilde(t)
        return s * torch.rsqrt(1.0 + s**2)

    def d_alpha(self, t):
        t = _as_tensor(t)
        s = self.sigma_tilde(t)
        return -s * (1.0 + s**2) ** -1.5 * self._ds_dt(t)

    def d_sigma(self, t):
        t = _as_tensor(t)
        s = self.sigma_tilde(t)
        return (1.0 + s**2) ** -1.5 * self._ds_dt(t)

    def t_from_sigma_tilde(self, s):
        s = _as_tensor(s)
        tab = self._s_table.to(device=s.device)
        s64 = s.to(torch.float64).clamp(0, float(tab[-1]))
        hi = torch.searchsorted(tab, s64.contiguous()).clamp(1, tab.numel() - 1)
        lo = hi - 1
        frac = (s64 - tab[lo]) / (tab[hi] - tab[lo])
        return (lo.to(torch.float64) + frac + self.t_clean).to(s.dtype)

    def alphas_cumprod_at(self, t: Tensor) -> Tensor:
        """``alpha(t)^2`` (equals ``alphas_cumprod[t - offset]`` at integer timesteps)."""
        return self.alpha(t) ** 2

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"DiscreteSchedule(T={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, timestep_offset={self.timestep_offset})")


def sdxl_schedule(timestep_offset: int = 0) -> DiscreteSchedule:
    """SDXL base: 1000 steps, scaled-linear betas 0.00085 -> 0.012, epsilon prediction; the tables are
    diffusers' float32 ``betas`` / ``alphas_cumprod`` (cast to float64)."""
    return DiscreteSchedule(1000, 0.00085, 0.012, "scaled_linear", timestep_offset=timestep_offset)
