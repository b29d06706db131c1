"""The ``NoiseSchedule`` interface: ``x_t = alpha(t) x_0 + sigma(t) eps`` and what follows from it.

Every schedule exposes, for a tensor ``t`` of times (any shape):

* ``alpha(t)``, ``sigma(t)`` and their time derivatives ``d_alpha(t)``, ``d_sigma(t)``;
* ``sigma_tilde(t) = sigma / alpha`` (the "VE" noise level of the scaled state ``x / alpha``)
  and its inverse ``t_from_sigma_tilde``;
* ``log_snr(t) = log(alpha^2 / sigma^2) = -2 log sigma_tilde`` and its inverse ``t_from_log_snr``;
* the forward SDE ``dx = f(t) x dt + g(t) dW`` with ``f = d log alpha / dt`` and
  ``g^2 = d sigma^2 / dt - 2 f sigma^2``.

The probability-flow ODE of every schedule is the same curve in the scaled coordinates
``y = x / alpha``, ``s = sigma_tilde``: ``dy/ds = (y - x0_hat) / s = eps_hat``. The solvers use this.

Subclasses: the continuous schedules in ``odecm.schedules``, the discrete (DDPM-family) one in
``odecm.discrete_schedule``; import them all from ``odecm.schedules``.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["NoiseSchedule"]


def _as_tensor(t, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(t, dtype=dtype)


class NoiseSchedule:
    """Base class. Subclasses implement ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` and
    ``t_from_sigma_tilde``; everything else follows."""

    t_min: float
    t_max: float
    #: time at which sigma = 0 (clean data), or None where the schedule never reaches it
    t_clean: float | None = None

    # --- to implement -------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_from_sigma_tilde(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    # --- derived --------------------------------------------------------------------------
    def sigma_tilde(self, t: Tensor) -> Tensor:
        """``s(t) = sigma(t) / alpha(t)``, the noise level of ``y = x / alpha``."""
        t = _as_tensor(t)
        return self.sigma(t) / self.alpha(t)

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``."""
        return -2.0 * torch.log(self.sigma_tilde(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of ``log_snr``."""
        lam = _as_tensor(lam)
        return self.t_from_sigma_tilde(torch.exp(-0.5 * lam))

    def drift(self, t: Tensor) -> Tensor:
        """``f(t) = d log alpha / dt`` of the forward SDE ``dx = f x dt + g dW``."""
        t = _as_tensor(t)
        return self.d_alpha(t) / self.alpha(t)

    def diffusion2(self, t: Tensor) -> Tensor:
        """``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2``."""
        t = _as_tensor(t)
        sig = self.sigma(t)
        return 2.0 * sig * self.d_sigma(t) - 2.0 * self.drift(t) * sig**2

    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)``."""
        return torch.sqrt(torch.clamp(self.diffusion2(t), min=0.0))

    def snr(self, t: Tensor) -> Tensor:
        """``alpha^2 / sigma^2``."""
        return self.sigma_tilde(t) ** -2

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
