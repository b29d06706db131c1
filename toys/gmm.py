"""Exact Gaussian-mixture world: density, score, denoiser and PF-ODE under any odecm schedule.

Data ``p_0 = sum_k w_k N(m_k, C_k)`` in ``R^d``. Under the forward process
``x_t = alpha(t) x_0 + sigma(t) eps`` every marginal is again a mixture,

    p_t(x) = sum_k w_k N(x; alpha m_k, alpha^2 C_k + sigma^2 I),

so with ``P_k = (alpha^2 C_k + sigma^2 I)^{-1}``, ``d_k = x - alpha m_k`` and the responsibilities
``r_k(x) = w_k N_k(x) / p_t(x)`` (computed with log-sum-exp):

    score(x)   = grad log p_t(x)  = -sum_k r_k P_k d_k
    E[x0 | x]  = sum_k r_k (m_k + alpha C_k P_k d_k)          (per-component Gaussian posterior means)
    eps_hat    = -sigma score,     and Tweedie: alpha E[x0|x] = x + sigma^2 score.

Numerics. Each covariance is stored by its eigendecomposition ``C_k = U_k diag(lam_k) U_k^T`` (done
once, in float64). Then ``alpha^2 C_k + sigma^2 I = U_k diag(alpha^2 lam_k + sigma^2) U_k^T`` for
*every* t, so the time-dependent "Cholesky factor" is diagonal in the fixed basis U_k and per-sample
times cost no matrix factorisations. Isotropic (``covs`` of shape ``(K,)``) and diagonal (``(K, d)``)
mixtures skip U and use a matmul-only fast path (no ``(B, K, d)`` temporaries when t is shared).
Zero variances are allowed with ``allow_zero_variance=True``: ``GaussianMixture.empirical(points)``
is the empirical distribution ``(1/K) sum_k delta_{m_k}`` of a data set (K in the thousands), whose
``p_t`` is a mixture of ``N(alpha m_k, sigma^2 I)`` for every ``sigma > 0``; its evaluations are two
matmuls per call (``toys.gmm_kernels``). Large batches are evaluated in row blocks, so memory stays
bounded at any K.
Computations run in the dtype and on the device of ``x`` (parameters are cast and cached per
(device, dtype)); pass float64 ``x`` for float64 results.

Time. ``t`` is a scalar or a ``(B,)`` tensor in the schedule's own time (the model timestep for
``DiscreteSchedule``); ``t=None`` means the clean data ``p_0`` (alpha = 1, sigma = 0).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from odecm.denoisers import Prediction
from odecm.schedules import NoiseSchedule

from .gmm_kernels import MixtureParams, evaluate_block, noise_coefficients
from .gmm_ode import ExactGMMDenoiser, exact_ode_solution, limit_threads

Tensor = torch.Tensor

__all__ = ["GaussianMixture", "ExactGMMDenoiser", "make_preset", "PRESETS", "limit_threads"]


class GaussianMixture:
    """``p_0 = sum_k w_k N(m_k, C_k)``.

    Args:
        weights: ``(K,)`` non-negative, normalised here.
        means: ``(K, d)``.
        covs: covariances (variance units): ``(K,)`` isotropic ``C_k = c_k I``, ``(K, d)`` diagonal,
            or ``(K, d, d)`` full (symmetric positive definite).
        dtype: default dtype of samples (``float32``; use ``torch.float64`` for reference work).
        device: default device of samples.
        allow_zero_variance: accept zero variances (isotropic / diagonal ``covs``): point masses,
            whose marginals exist only at ``sigma > 0`` (see ``empirical``).

    Master parameters are kept in float64; see the module docstring for the formulas.
    """

    def __init__(self, weights: Any, means: Any, covs: Any, dtype: torch.dtype = torch.float32, device: Any = None,
                 allow_zero_variance: bool = False):
        means = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        if weights.shape != (K,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be non-negative with shape ({K},), got {tuple(weights.shape)}")
        covs = torch.as_tensor(covs, dtype=torch.float64).detach().cpu()
        self._U: Tensor | None = None
        if covs.shape == (K,):
            self.cov_type = "isotropic"
            self._var = covs.clone()
        elif covs.shape == (K, d):
            self.cov_type = "diagonal"
            self._var = covs.clone()
        elif covs.shape == (K, d, d):
            self.cov_type = "full"
            sym = 0.5 * (covs + covs.transpose(-1, -2))
            lam, U = torch.linalg.eigh(sym)
            self._var, self._U = lam, U
        else:
            raise ValueError(f"covs must have shape ({K},) isotropic, ({K}, {d}) diagonal or ({K}, {d}, {d}) full; got {tuple(covs.shape)}")
        if allow_zero_variance and self.cov_type != "full":
            if not bool((self._var >= 0).all()):
                raise ValueError("variances must be >= 0")
        elif not bool((self._var > 0).all()):
            raise ValueError("covariances must be positive definite (all variances / eigenvalues > 0); "
                             "pass allow_zero_variance=True for point masses (isotropic / diagonal covs)")
        self.weights = weights / weights.sum()
        self.means = means
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache: dict[tuple, MixtureParams] = {}

    @classmethod
    def empirical(cls, points: Any, weights: Any = None, dtype: torch.dtype = torch.float32,
                  device: Any = None) -> "GaussianMixture":
        """The empirical distribution ``sum_k w_k delta_{m_k}`` of ``points (K, d)`` (uniform weights by
        default): K zero-variance components. Under the forward process it is the mixture of
        ``N(alpha m_k, sigma^2 I)``, whose exact score and denoiser ``E[x0 | x_t] = sum_k r_k m_k`` this
        class evaluates for ``sigma > 0``; its PF-ODE maps noise onto the points."""
        pts = torch.as_tensor(points, dtype=torch.float64).detach().cpu()
        if pts.dim() != 2:
            raise ValueError(f"points must have shape (K, d), got {tuple(pts.shape)} (flatten images first)")
        K = pts.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights
        return cls(w, pts, torch.zeros(K, dtype=torch.float64), dtype=dtype, device=device, allow_zero_variance=True)

    @property
    def is_empirical(self) -> bool:
        """Every component is a point mass (all variances zero)."""
        return self.cov_type != "full" and bool((self._var == 0).all())

    # ------------------------------------------------------------------ basic properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> Tensor:
        """Full covariances ``(K, d, d)`` in float64 (built on demand)."""
        K, d = self.means.shape
        if self.cov_type == "isotropic":
            return self._var[:, None, None] * torch.eye(d, dtype=torch.float64).expand(K, d, d)
        if self.cov_type == "diagonal":
            return torch.diag_embed(self._var)
        U = self._U
        return U @ torch.diag_embed(self._var) @ U.transpose(-1, -2)

    @property
    def component_variances(self) -> Tensor:
        """Isotropic ``(K,)``, else the per-axis variances / eigenvalues ``(K, d)`` (float64)."""
        return self._var.clone()

    @property
    def eigenvectors(self) -> Tensor | None:
        return None if self._U is None else self._U.clone()

    def mean(self) -> Tensor:
        """Mixture mean ``sum_k w_k m_k`` (float64)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Mixture covariance ``sum_k w_k (C_k + m_k m_k^T) - mu mu^T`` (float64)."""
        mu = self.mean()
        centred = self.means - mu
        between = (centred * self.weights[:, None]).T @ centred
        if self.cov_type == "full":
            return between + (self.weights[:, None, None] * self.covs).sum(0)
        var = self._var[:, None].expand(-1, self.dim) if self.cov_type == "isotropic" else self._var
        return between + torch.diag(self.weights @ var)

    def data_std(self) -> float:
        """Root-mean per-coordinate standard deviation ``sqrt(trace(Cov) / d)``."""
        return math.sqrt(float(torch.trace(self.covariance())) / self.dim)

    def mode_spacing(self) -> float:
        """Smallest distance between two component means (``sqrt(mean trace C_k)`` if K = 1)."""
        if self.num_components < 2:
            return math.sqrt(float(torch.diagonal(self.covs, dim1=-2, dim2=-1).sum(-1).mean()))
        return self._min_pairwise_distance(positive=False)

    def one_hot_sigma(self) -> float:
        """``sigma_tilde`` below which an empirical mixture's posterior over its points is one-hot (log-odds of
        order 1e4): 1e-2 x the smallest distance between distinct points (1e-2 for a single point)."""
        spacing = self._min_pairwise_distance(positive=True) if self.num_components > 1 else 1.0
        return 1e-2 * (spacing if math.isfinite(spacing) else 1.0)

    def _min_pairwise_distance(self, positive: bool, block: int = 1024) -> float:
        """Smallest ``|m_j - m_k|`` over ``j != k`` (``positive``: over distinct means), in row blocks."""
        best = float("inf")
        K = self.num_components
        for i in range(0, K, block):
            dist = torch.cdist(self.means[i:i + block], self.means)
            rows = torch.arange(i, min(i + block, K))
            dist[rows - i, rows] = float("inf")
            if positive:
                dist[dist <= 0] = float("inf")
            best = min(best, float(dist.min()))
        return best

    def min_std(self) -> float:
        """Smallest standard deviation of any component along any axis."""
        return math.sqrt(float(self._var.min()))

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "GaussianMixture":
        """Change the default device / sample dtype (computations always follow ``x``)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def transformed(self, mean_shift: Tensor | None = None, var_scale: float = 1.0, weights: Tensor | None = None) -> "GaussianMixture":
        """A new mixture with means ``m_k + mean_shift_k`` and covariances ``var_scale * C_k``
        (eigenvectors kept, so ``mean_shift=0, var_scale=1`` reproduces this mixture bit for bit)."""
        new = GaussianMixture.__new__(GaussianMixture)
        new.cov_type, new.dtype, new.device, new._cache = self.cov_type, self.dtype, self.device, {}
        new.means = self.means + (0.0 if mean_shift is None else torch.as_tensor(mean_shift, dtype=torch.float64))
        new._var = self._var * float(var_scale)
        new._U = None if self._U is None else self._U.clone()
        new.weights = self.weights.clone() if weights is None else torch.as_tensor(weights, dtype=torch.float64) / float(torch.as_tensor(weights).sum())
        return new

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim}, cov_type={self.cov_type!r}, data_std={self.data_std():.3f})"

    # ------------------------------------------------------------------ internals
    def _params(self, device: torch.device, dtype: torch.dtype) -> MixtureParams:
        key = (str(device), dtype)
        p = self._cache.get(key)
        if p is None:
            cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
            means_rot = None if self._U is None else torch.einsum("kij,ki->kj", self._U, self.means)
            kind = "empirical" if self.is_empirical else self.cov_type
            mean_sq = (self.means * self.means).sum(-1) if kind == "empirical" else None
            p = MixtureParams(cast(torch.log(self.weights)), cast(self.means), cast(self._var), cast(self._U),
                              cast(means_rot), kind, cast(mean_sq))
            self._cache[key] = p
        return p

    @staticmethod
    def _coefficients(x: Tensor, t: Any, schedule: NoiseSchedule | None) -> tuple[Tensor, Tensor]:
        """alpha, sigma as 0-dim tensors (shared time) or ``(B, 1)`` (per-sample); see ``toys.gmm_kernels``."""
        return noise_coefficients(x, t, schedule)

    #: rows per block in ``_evaluate``: keeps the (rows, K) temporaries cache-resident
    block_elements: int = 1 << 19

    def _evaluate(self, x: Tensor, t: Any, schedule: NoiseSchedule | None, want: set[str]) -> dict[str, Tensor]:
        """Core routine; ``want`` is a subset of {logp, resp, score, x0, eps}. See module docstring.
        Large batches are processed in row blocks (same result, much less memory traffic)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.to(self.dtype)
        p = self._params(x.device, x.dtype)
        a, s = self._coefficients(x, t, schedule)
        B = x.shape[0]
        per_row = self.num_components * (1 if p.cov_type in ("isotropic", "empirical") else self.dim)
        rows = max(256, self.block_elements // max(per_row, 1))
        if B <= rows:
            return evaluate_block(p, x, a, s, want)
        outs = []
        for i in range(0, B, rows):
            sl = slice(i, i + rows)
            outs.append(evaluate_block(p, x[sl], a if a.dim() == 0 else a[sl], s if s.dim() == 0 else s[sl], want))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    # ------------------------------------------------------------------ public evaluation API
    def log_prob_t(self, x: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> Tensor:
        """``log p_t(x)``, shape ``(B,)``; ``t=None`` gives ``log p_0``."""
        return self._evaluate(x, t, schedule, {"logp"})["logp"]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p_0(x)`` of the clean data, shape ``(B,)``."""
        return self.log_prob_t(x, None, None)

    def component_log_probs(self, x: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> Tensor:
        """``log w_k + log N_k(x)`` for every component, ``(B, K)`` (the logits of the responsibilities)."""
        r = self._evaluate(x, t, schedule, {"resp", "logp"})
        return torch.log(r["resp"]) + r["logp"][:, None]

    def responsibilities(self, x: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> Tensor:
        """``r_k(x) = p(component k | x_t = x)``, ``(B, K)``."""
        return self._evaluate(x, t, schedule, {"resp"})["resp"]

    def score(self, x: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha m_k)``."""
        return self._evaluate(x, t, schedule, {"score"})["score"]

    def posterior_mean_x0(self, x: Tensor, t: Any, schedule: NoiseSchedule) -> Tensor:
        """Exact denoiser ``E[x0 | x_t = x] = sum_k r_k (m_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha m_k))``."""
        return self._evaluate(x, t, schedule, {"x0"})["x0"]

    def denoise(self, x: Tensor, t: Any, schedule: NoiseSchedule) -> Prediction:
        """Both ``x0_hat = E[x0|x_t]`` and ``eps_hat = -sigma score`` from one pass."""
        r = self._evaluate(x, t, schedule, {"x0", "eps"})
        return Prediction(x0=r["x0"], eps=r["eps"])

    # ------------------------------------------------------------------ 1D projections (exact CDFs)
    def project(self, direction: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The 1D mixture of ``u^T x_t``: ``(weights, means alpha u^T m_k, variances alpha^2 u^T C_k u + sigma^2 |u|^2)``
        (float64; ``t`` scalar or None)."""
        u = torch.as_tensor(direction, dtype=torch.float64).reshape(-1).cpu()
        a, s = self._coefficients(torch.zeros(1, self.dim, dtype=torch.float64), t, schedule)
        a, s = float(a.reshape(-1)[0]), float(s.reshape(-1)[0])
        if self.cov_type == "full":
            var = torch.einsum("i,kij,j->k", u, self.covs, u)
        elif self.cov_type == "isotropic":
            var = self._var * float(u @ u)
        else:
            var = self._var @ (u * u)
        return self.weights.clone(), a * (self.means @ u), a * a * var + s * s * float(u @ u)

    def cdf_1d(self, values: Tensor, direction: Tensor, t: Any = None, schedule: NoiseSchedule | None = None) -> Tensor:
        """Exact CDF of ``u^T x_t`` at ``values`` (float64)."""
        w, m, v = self.project(direction, t, schedule)
        z = (torch.as_tensor(values, dtype=torch.float64).reshape(-1, 1).cpu() - m) / torch.sqrt(v)
        return (w * 0.5 * torch.erfc(-z / math.sqrt(2.0))).sum(-1)

    # ------------------------------------------------------------------ sampling
    def sample_p0(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                  device: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` samples of the data and their component labels: ``(x (n, d), labels (n,) long)``.
        Random numbers are drawn on the generator's device (float64), then cast to ``dtype``/``device``."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        labels = torch.multinomial(self.weights.to(gdev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gdev)
        lab = labels.cpu()
        std = torch.sqrt(self._var[lab])
        if self.cov_type == "isotropic":
            x = self.means[lab] + std[:, None] * z.cpu()
        elif self.cov_type == "diagonal":
            x = self.means[lab] + std * z.cpu()
        else:
            x = self.means[lab] + torch.einsum("bij,bj->bi", self._U[lab], std * z.cpu())
        dev = torch.device(device) if device is not None else self.device
        return x.to(device=dev, dtype=dtype or self.dtype), labels.to(dev)

    def sample_pt(self, n: int, t: Any, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                  dtype: torch.dtype | None = None, device: Any = None, return_x0: bool = False):
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``x0 ~ p_0``: returns ``(x_t, labels)``, or
        ``(x_t, labels, x0, eps)`` with ``return_x0=True``. ``t`` scalar or ``(n,)``."""
        x0, labels = self.sample_p0(n, generator, dtype=torch.float64, device="cpu")
        gdev = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gdev).cpu()
        a, s = self._coefficients(x0, t, schedule)
        xt = a * x0 + s * eps
        dev = torch.device(device) if device is not None else self.device
        dt = dtype or self.dtype
        cast = lambda v: v.to(device=dev, dtype=dt)  # noqa: E731
        if return_x0:
            return cast(xt), labels.to(dev), cast(x0), cast(eps)
        return cast(xt), labels.to(dev)

    # ------------------------------------------------------------------ denoiser and exact ODE (toys.gmm_ode)
    def exact_denoiser(self, schedule: NoiseSchedule) -> ExactGMMDenoiser:
        return ExactGMMDenoiser(self, schedule)

    def exact_ode_solution(self, x_T: Tensor, t_from: float, t_to: float, schedule: NoiseSchedule,
                           rtol: float = 1e-8, atol: float = 1e-8, method: str = "dopri5",
                           return_nfe: bool = False, threads: int | None = -1):
        """The exact PF-ODE map ``x(t_from) -> x(t_to)``: ``toys.gmm_ode.exact_ode_solution`` (its docstring
        says how the clean point is reached)."""
        return exact_ode_solution(self, x_T, t_from, t_to, schedule, rtol, atol, method, return_nfe, threads)


# presets live in toys.gmm_presets; re-exported here (imported last: they build GaussianMixture objects)
from .gmm_presets import PRESETS, make_preset  # noqa: E402
