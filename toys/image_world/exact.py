"""The exact teacher of the image world: the score of the training set's empirical distribution.

``p_0 = (1/K) sum_k delta_{m_k}`` over the K training images (or their latents), so under the forward
process ``p_t = (1/K) sum_k N(alpha m_k, sigma^2 I)`` and

    x0_hat(x, t) = E[x0 | x_t = x] = sum_k r_k(x, t) m_k,   r = softmax_k(-|x - alpha m_k|^2 / (2 sigma^2)),
    eps_hat      = (x - alpha x0_hat) / sigma.

It is ``toys.gmm.GaussianMixture.empirical`` on the flattened images (float64 by default, batched and
row-blocked over K). Its PF-ODE maps noise onto training images: the true ODE of this world.
Class-conditional version: one empirical mixture per class; the label ``num_classes`` (the null
label) and ``cond=None`` mean the unconditional mixture, so ``odecm.denoisers.CFGDenoiser`` with
``uncond = null label`` gives the guided exact teacher.
"""
from __future__ import annotations

from typing import Any

import torch

from odecm.denoisers import Denoiser, Prediction
from odecm.schedules import NoiseSchedule
from odecm.solvers import solve_adaptive
from toys.gmm import GaussianMixture

Tensor = torch.Tensor

__all__ = ["EmpiricalDenoiser", "exact_ode_endpoint"]


class EmpiricalDenoiser(Denoiser):
    """Exact denoiser of the empirical distribution of ``points (K, C, H, W)`` (images in, images out).

    ``labels``/``num_classes`` make it class-conditional: ``cond`` is a ``(B,)`` long tensor of labels
    in ``0..num_classes`` (``num_classes`` = unconditional). Computations run in ``dtype`` (float64 by
    default) and are cast back to the input's dtype. It has no density at sigma = 0
    (``finite_at_zero_noise = False``: ``heun_vp``'s last corrector then uses the smallest positive level)."""

    finite_at_zero_noise = False

    def __init__(self, points: Tensor, schedule: NoiseSchedule, labels: Tensor | None = None,
                 num_classes: int = 0, dtype: torch.dtype = torch.float64):
        super().__init__(schedule)
        self.shape = tuple(points.shape[1:])
        self.dtype = dtype
        flat = points.reshape(points.shape[0], -1).double()
        self.mixture = GaussianMixture.empirical(flat)
        self.num_classes = int(num_classes)
        self.class_mixtures: list[GaussianMixture] = []
        if num_classes:
            if labels is None:
                raise ValueError("a class-conditional empirical teacher needs the labels")
            for c in range(num_classes):
                sel = flat[labels == c]
                if sel.shape[0] == 0:
                    raise ValueError(f"class {c} has no training image")
                self.class_mixtures.append(GaussianMixture.empirical(sel))

    @property
    def points(self) -> Tensor:
        """The training points, ``(K, C, H, W)`` float64."""
        return self.mixture.means.reshape(-1, *self.shape)

    def floor_sigma(self) -> float:
        """``sigma_tilde`` below which the posterior is one-hot (``GaussianMixture.one_hot_sigma``)."""
        return self.mixture.one_hot_sigma()

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Prediction:
        B = x.shape[0]
        flat = x.reshape(B, -1).to(self.dtype)
        tt = t.to(torch.float64)
        if cond is None or not self.num_classes:
            out = self.mixture.denoise(flat, tt, self.schedule)
            x0, eps = out.x0, out.eps
        else:
            labels = torch.as_tensor(cond).long().reshape(-1)
            x0, eps = torch.empty_like(flat), torch.empty_like(flat)
            for c in labels.unique().tolist():
                rows = (labels == c).nonzero(as_tuple=True)[0]
                gmm = self.mixture if c == self.num_classes else self.class_mixtures[c]
                out = gmm.denoise(flat[rows], tt[rows] if tt.dim() else tt, self.schedule)
                x0[rows], eps[rows] = out.x0, out.eps
        return Prediction(x0=x0.reshape(x.shape).to(x.dtype), eps=eps.reshape(x.shape).to(x.dtype))


@torch.no_grad()
def exact_ode_endpoint(denoiser: Denoiser, x_T: Tensor, t_from: float, s_floor: float, cond: Any = None,
                       rtol: float = 1e-6, atol: float = 1e-6, chunk: int = 2048) -> Tensor:
    """The PF-ODE of ``denoiser`` from ``t_from`` to the clean point, for denoisers whose posterior is
    one-hot below ``sigma_tilde = s_floor`` (the empirical teacher, guided or not): dopri5 in float64
    down to ``t(s_floor)``, then ``x0_hat`` there (the flow below is ``y(s) = x0_hat + (s / s_floor)
    (y - x0_hat)`` with ``x0_hat`` constant). Runs in chunks of ``chunk`` rows (the adaptive step is
    shared within a chunk); returns float64."""
    sch = denoiser.schedule
    t_end = float(sch.t_from_sigma_tilde(torch.tensor(s_floor, dtype=torch.float64)))
    outs = []
    for i in range(0, x_T.shape[0], chunk):
        c = None if cond is None else cond[i:i + chunk]
        x, _ = solve_adaptive(denoiser, x_T[i:i + chunk].double(), t_from, t_end, c, rtol=rtol, atol=atol)
        outs.append(denoiser(x.double(), torch.tensor(t_end, dtype=torch.float64), c).x0.double())
    return torch.cat(outs)
