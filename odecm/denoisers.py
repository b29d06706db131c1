"""The one interface solvers and losses see: a denoiser.

A denoiser is called as ``denoiser(x, t, cond) -> Prediction`` where ``x`` is the noisy state
(``x = alpha(t) x0 + sigma(t) eps``), ``t`` a tensor of shape ``(B,)`` (one time per sample) or a
scalar, and ``cond`` any conditioning (``None``, a tensor, or a dict / tuple of tensors whose first
dimension is the batch). It returns both parameterisations of the same prediction:

    x0_hat = (x - sigma eps_hat) / alpha,     eps_hat = (x - alpha x0_hat) / sigma.

Adapters turn raw networks ``model(x, t, cond) -> tensor`` predicting eps, x0, v
(``v = alpha eps - sigma x0``) or the score (``grad log p_t = -eps / sigma``) into denoisers.
``CFGDenoiser`` applies classifier-free guidance with a *named* convention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from .schedules import NoiseSchedule

Tensor = torch.Tensor

__all__ = [
    "Prediction",
    "Denoiser",
    "EpsDenoiser",
    "X0Denoiser",
    "VDenoiser",
    "ScoreDenoiser",
    "FunctionDenoiser",
    "CFGDenoiser",
    "NFECounter",
    "broadcast_time",
    "batch_time",
    "index_cond",
    "concat_cond",
    "zeros_like_cond",
    "imagen_from_lcm",
    "lcm_from_imagen",
]


def broadcast_time(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample quantity ``(B,)`` (or scalar) to broadcast against ``x`` of shape ``(B, ...)``."""
    v = torch.as_tensor(v, device=x.device)
    if v.dim() == 0:
        return v.to(x.dtype)
    return v.to(x.dtype).reshape(v.shape[0], *([1] * (x.dim() - 1)))


def batch_time(t: Any, x: Tensor) -> Tensor:
    """A time tensor of shape ``(B,)`` on x's device: scalars are expanded to the batch.

    Python numbers and integer tensors become float64 for float64 ``x`` and float32 otherwise
    (a Python float must not be rounded to float32 when the state is float64)."""
    float_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=float_dtype, device=x.device)
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(float_dtype)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


def index_cond(cond: Any, idx: Tensor) -> Any:
    """Select batch rows ``idx`` of a conditioning structure (None, tensor, dict, list or tuple)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, dict):
        return {k: index_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(index_cond(v, idx) for v in cond)
    return cond  # scalars and other objects are shared by the batch


def concat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditioning structures of the same layout along the batch dimension."""
    if a is None:
        return None
    if isinstance(a, Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict):
        return {k: concat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(concat_cond(u, v) for u, v in zip(a, b))
    return a


def zeros_like_cond(cond: Any) -> Any:
    """The paper's unconditional input: every tensor of ``cond`` zeroed."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return torch.zeros_like(cond)
    if isinstance(cond, dict):
        return {k: zeros_like_cond(v) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(zeros_like_cond(v) for v in cond)
    return cond


@dataclass
class Prediction:
    """A denoiser's output: the clean-data estimate and the noise estimate of the same point."""

    x0: Tensor
    eps: Tensor


class Denoiser(nn.Module):
    """Base class. Subclasses implement ``forward(x, t, cond) -> Prediction``.

    ``t`` arrives as a tensor of shape ``(B,)``; ``self.schedule`` gives alpha(t), sigma(t).

    ``finite_at_zero_noise``: whether the denoiser may be evaluated where ``sigma(t) = 0`` (the clean
    point). True (default) for eps-predicting networks (the paper's UNet: ``x0_hat = x`` there) and
    denoisers that compute eps directly (the exact GMM denoiser); False where eps comes out as
    ``(x - alpha x0_hat) / sigma`` (x0-predicting networks) or the network's time input diverges at
    sigma = 0 (e.g. ``c_noise = log sigma``). Solvers that would evaluate at the clean point
    (``heun_vp``'s last corrector) evaluate at the schedule's ``t_min`` instead when it is False.
    Wrappers (``CFGDenoiser``, ``NFECounter``) forward the inner denoiser's value.
    """

    finite_at_zero_noise: bool = True

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.schedule = schedule

    def coefficients(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha(t), sigma(t)`` shaped to broadcast against ``x``."""
        return broadcast_time(self.schedule.alpha(t), x), broadcast_time(self.schedule.sigma(t), x)

    def from_x0(self, x: Tensor, t: Tensor, x0: Tensor) -> Prediction:
        a, s = self.coefficients(x, t)
        return Prediction(x0=x0, eps=(x - a * x0) / s)

    def from_eps(self, x: Tensor, t: Tensor, eps: Tensor) -> Prediction:
        a, s = self.coefficients(x, t)
        return Prediction(x0=(x - s * eps) / a, eps=eps)

    def __call__(self, x: Tensor, t: Any, cond: Any = None) -> Prediction:  # type: ignore[override]
        return super().__call__(x, batch_time(t, x), cond)


class _ModelDenoiser(Denoiser):
    def __init__(self, model: Callable, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.model = model

    def raw(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.model(x, t, cond)


class EpsDenoiser(_ModelDenoiser):
    """Network predicts eps: ``x0_hat = (x - sigma eps_hat) / alpha``."""

    def forward(self, x, t, cond=None):
        return self.from_eps(x, t, self.raw(x, t, cond))


class X0Denoiser(_ModelDenoiser):
    """Network predicts x0 directly: ``eps_hat = (x - alpha x0_hat) / sigma`` (not finite at sigma = 0)."""

    finite_at_zero_noise = False

    def forward(self, x, t, cond=None):
        return self.from_x0(x, t, self.raw(x, t, cond))


class VDenoiser(_ModelDenoiser):
    """Network predicts ``v = alpha eps - sigma x0`` (for VP, alpha^2 + sigma^2 = 1):
    ``x0_hat = (alpha x - sigma v) / (alpha^2 + sigma^2)``, ``eps_hat = (sigma x + alpha v) / (alpha^2 + sigma^2)``."""

    def forward(self, x, t, cond=None):
        v = self.raw(x, t, cond)
        a, s = self.coefficients(x, t)
        norm = a**2 + s**2
        return Prediction(x0=(a * x - s * v) / norm, eps=(s * x + a * v) / norm)


class ScoreDenoiser(_ModelDenoiser):
    """Network predicts the score ``grad_x log p_t(x)``: ``eps_hat = -sigma score``
    (Tweedie: ``alpha x0_hat = x + sigma^2 score``). The score diverges as sigma -> 0."""

    finite_at_zero_noise = False

    def forward(self, x, t, cond=None):
        _, s = self.coefficients(x, t)
        return self.from_eps(x, t, -s * self.raw(x, t, cond))


class FunctionDenoiser(Denoiser):
    """Wrap a function ``fn(x, t, cond) -> x0_hat`` (``predicts='x0'``) or ``-> eps_hat`` (``'eps'``).
    ``finite_at_zero_noise`` is True for ``'eps'`` and False for ``'x0'``."""

    def __init__(self, fn: Callable, schedule: NoiseSchedule, predicts: Literal["x0", "eps"] = "x0"):
        super().__init__(schedule)
        if predicts not in ("x0", "eps"):
            raise ValueError(f"predicts={predicts!r}; allowed: 'x0', 'eps'")
        self.fn, self.predicts = fn, predicts
        self.finite_at_zero_noise = predicts == "eps"

    def forward(self, x, t, cond=None):
        out = self.fn(x, t, cond)
        return self.from_x0(x, t, out) if self.predicts == "x0" else self.from_eps(x, t, out)


CFGConvention = Literal["lcm", "imagen"]


def imagen_from_lcm(w_lcm: float) -> float:
    """``uncond + w_i (cond - uncond) == cond + w_l (cond - uncond)`` iff ``w_i = w_l + 1``."""
    return w_lcm + 1.0


def lcm_from_imagen(w_imagen: float) -> float:
    return w_imagen - 1.0


def _expand_batch(cond: Any, batch: int) -> Any:
    """Expand every tensor of a conditioning structure whose batch dimension is 1 to ``batch`` rows."""
    if isinstance(cond, Tensor):
        return cond.expand(batch, *cond.shape[1:]) if cond.dim() > 0 and cond.shape[0] == 1 and batch > 1 else cond
    if isinstance(cond, dict):
        return {k: _expand_batch(v, batch) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_expand_batch(v, batch) for v in cond)
    return cond


class CFGDenoiser(Denoiser):
    """Classifier-free guidance around a conditional denoiser.

    Conventions (name one, always):

    * ``"imagen"``: ``pred = uncond + w (cond - uncond)`` (w = 1 is no guidance; the paper's w = 9);
    * ``"lcm"``:    ``pred = cond + w (cond - uncond)``   (w = 0 is no guidance; ``w_imagen = w_lcm + 1``).

    The combination is applied to eps; since x0 is affine in eps with the same (x, t), the x0
    combination is identical. Cond and uncond go through the inner denoiser in **one** call on a
    doubled batch. ``uncond`` is the caller's: a fixed structure (batch 1 or B), or a function
    ``cond -> uncond``; the default zeroes every tensor of ``cond`` (the paper's choice).
    """

    def __init__(
        self,
        inner: Denoiser,
        guidance_scale: float | Tensor,
        convention: CFGConvention,
        uncond: Any | Callable[[Any], Any] = zeros_like_cond,
    ):
        super().__init__(inner.schedule)
        if convention not in ("lcm", "imagen"):
            raise ValueError(f"convention={convention!r}; allowed: 'lcm', 'imagen'")
        if not isinstance(guidance_scale, Tensor):
            guidance_scale = float(guidance_scale)
        self.inner, self.guidance_scale, self.convention, self.uncond = inner, guidance_scale, convention, uncond

    @property
    def finite_at_zero_noise(self) -> bool:  # type: ignore[override]
        return self.inner.finite_at_zero_noise

    @property
    def imagen_scale(self) -> float | Tensor:
        """The scale in the imagen convention: a float, or a per-sample tensor ``(B,)``."""
        return self.guidance_scale if self.convention == "imagen" else imagen_from_lcm(self.guidance_scale)

    def _uncond_for(self, cond: Any, batch: int) -> Any:
        u = self.uncond(cond) if callable(self.uncond) else self.uncond
        return _expand_batch(u, batch)

    def forward(self, x, t, cond=None):
        w = self.imagen_scale
        if isinstance(w, Tensor):
            w = broadcast_time(w, x)
        elif w == 1.0:
            return self.inner(x, t, cond)
        uncond = self._uncond_for(cond, x.shape[0])
        both = self.inner(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, uncond))
        eps_c, eps_u = both.eps.chunk(2)
        return self.from_eps(x, t, eps_u + w * (eps_c - eps_u))


class NFECounter(Denoiser):
    """Counts calls to a denoiser: ``calls`` (batched network evaluations) and ``evals``
    (sample evaluations, the sum of batch sizes)."""

    def __init__(self, inner: Denoiser):
        super().__init__(inner.schedule)
        self.inner = inner
        self.calls = 0
        self.evals = 0

    @property
    def finite_at_zero_noise(self) -> bool:  # type: ignore[override]
        return self.inner.finite_at_zero_noise

    def reset(self) -> None:
        self.calls = self.evals = 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        self.evals += int(x.shape[0])
        return self.inner(x, t, cond)
