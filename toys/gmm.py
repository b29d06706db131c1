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
Computations run in the dtype and on the device of ``x`` (parameters are cast and cached per
(device, dtype)); pass float64 ``x`` for float64 results.

Time. ``t`` is a scalar or a ``(B,)`` tensor in the schedule's own time (the model timestep for
``DiscreteSchedule``); ``t=None`` means the clean data ``p_0`` (alpha = 1, sigma = 0).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from odecm.denoisers import Denoiser, Prediction
from odecm.schedules import NoiseSchedule

Tensor = torch.Tensor

__all__ = ["GaussianMixture", "ExactGMMDenoiser", "make_preset", "PRESETS", "limit_threads"]

_LOG_2PI = math.log(2.0 * math.pi)


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run a loop of small-tensor ops with ``n`` intra-op threads (``None``: unchanged). On a shared
    CPU, 2+ threads on tiny ops were measured 6-25x slower than 1. Restores the previous setting."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@dataclass
class _Params:
    log_w: Tensor  # (K,)
    means: Tensor  # (K, d)
    var: Tensor  # isotropic (K,), diagonal/full eigenvalues (K, d)
    U: Tensor | None  # full only: (K, d, d), columns are eigenvectors
    means_rot: Tensor | None  # full only: U_k^T m_k, (K, d)


class GaussianMixture:
    """``p_0 = sum_k w_k N(m_k, C_k)``.

    Args:
        weights: ``(K,)`` non-negative, normalised here.
        means: ``(K, d)``.
        covs: covariances (variance units): ``(K,)`` isotropic ``C_k = c_k I``, ``(K, d)`` diagonal,
            or ``(K, d, d)`` full (symmetric positive definite).
        dtype: default dtype of samples (``float32``; use ``torch.float64`` for reference work).
        device: default device of samples.

    Master parameters are kept in float64; see the module docstring for the formulas.
    """

    def __init__(self, weights: Any, means: Any, covs: Any, dtype: torch.dtype = torch.float32, device: Any = None):
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
        if not bool((self._var > 0).all()):
            raise ValueError("covariances must be positive definite (all variances / eigenvalues > 0)")
        self.weights = weights / weights.sum()
        self.means = means
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache: dict[tuple, _Params] = {}

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
        second = (self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return second - mu[:, None] * mu[None, :]

    def data_std(self) -> float:
        """Root-mean per-coordinate standard deviation ``sqrt(trace(Cov) / d)``."""
        return math.sqrt(float(torch.trace(self.covariance())) / self.dim)

    def mode_spacing(self) -> float:
        """Smallest distance between two component means (``sqrt(mean trace C_k)`` if K = 1)."""
        if self.num_components < 2:
            return math.sqrt(float(torch.diagonal(self.covs, dim1=-2, dim2=-1).sum(-1).mean()))
        dist = torch.cdist(self.means, self.means)
        dist.fill_diagonal_(float("inf"))
        return float(dist.min())

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
    def _params(self, device: torch.device, dtype: torch.dtype) -> _Params:
        key = (str(device), dtype)
        p = self._cache.get(key)
        if p is None:
            cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
            means_rot = None if self._U is None else torch.einsum("kij,ki->kj", self._U, self.means)
            p = _Params(cast(torch.log(self.weights)), cast(self.means), cast(self._var), cast(self._U), cast(means_rot))
            self._cache[key] = p
        return p

    @staticmethod
    def _coefficients(x: Tensor, t: Any, schedule: NoiseSchedule | None) -> tuple[Tensor, Tensor]:
        """alpha, sigma as 0-dim tensors (shared time) or ``(B, 1)`` (per-sample), in x's dtype.
        A per-sample ``t`` whose entries are all equal takes the shared-time fast path."""
        if t is None:
            one = torch.ones((), dtype=x.dtype, device=x.device)
            return one, torch.zeros_like(one)
        if schedule is None:
            raise ValueError("a schedule is needed when t is given (t=None means the clean data p_0)")
        t = (t.to(device=x.device) if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64, device=x.device)).to(torch.float64)
        if t.dim() == 1 and t.numel() == x.shape[0] and t.numel() > 0 and bool((t == t[0]).all()):
            t = t[0]
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != x.shape[0]):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        a = schedule.alpha(t).to(x.dtype)
        s = schedule.sigma(t).to(x.dtype)
        if t.dim() == 1:
            a, s = a[:, None], s[:, None]
        return a, s

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
        rows = max(256, self.block_elements // max(self.num_components * (1 if self.cov_type == "isotropic" else self.dim), 1))
        if B <= rows:
            return self._evaluate_block(p, x, a, s, want)
        outs = []
        for i in range(0, B, rows):
            sl = slice(i, i + rows)
            outs.append(self._evaluate_block(p, x[sl], a if a.dim() == 0 else a[sl], s if s.dim() == 0 else s[sl], want))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @staticmethod
    def _normalise(logits: Tensor, want: set[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Responsibilities ``r = softmax(logits)`` (torch's fused, stable kernel) and, when wanted,
        ``out['logp'] = logsumexp(logits)`` and ``out['resp'] = r``."""
        out: dict[str, Tensor] = {}
        if "logp" in want:
            out["logp"] = torch.logsumexp(logits, dim=-1)
        r = torch.softmax(logits, dim=-1)
        if "resp" in want:
            out["resp"] = r
        return r, out

    def _evaluate_block(self, p: _Params, x: Tensor, a: Tensor, s: Tensor, want: set[str]) -> dict[str, Tensor]:
        d = self.dim
        shared = a.dim() == 0
        need_score = bool(want & {"score", "eps"})
        need_x0 = "x0" in want
        if self.cov_type != "full" and shared:
            # log N_k(x) is linear in the features [x, x*x]: logits = [x, x*x] @ W + c (one matmul);
            # sums over k of r_k * (per-k row) are one more matmul.
            var = p.var[:, None].expand(-1, d) if self.cov_type == "isotropic" else p.var  # (K, d)
            v = a * a * var + s * s
            iv = 1.0 / v
            miv = p.means * iv
            W = torch.cat([(a * miv).T, (-0.5 * iv).T], 0)  # (2d, K)
            c = p.log_w - 0.5 * ((a * a) * (p.means * miv).sum(-1) + torch.log(v).sum(-1) + d * _LOG_2PI)
            logits = torch.addmm(c, torch.cat([x, x * x], -1), W)
            r, out = self._normalise(logits, want)
            if need_score or need_x0:
                cols = [miv]  # sum_k r_k m_k / v_k
                cols.append(iv if need_score else iv[:, :0])  # sum_k r_k / v_k
                if need_x0:
                    cols.append(var * iv)  # sum_k r_k c_k / v_k
                G = r @ torch.cat(cols, -1)
                rmiv, riv = G[:, :d], G[:, d : d + (d if need_score else 0)]
                if need_score:
                    # score = -sum_k r_k (x - a m_k) / v_k
                    out["score"] = a * rmiv - x * riv
                if need_x0:
                    # posterior mean of component k: (s^2 m_k + a c_k x) / v_k
                    out["x0"] = (s * s) * rmiv + (a * x) * G[:, -d:]
        elif self.cov_type == "isotropic":
            # per-sample t: v is (B, K)
            v = a * a * p.var + s * s
            iv = 1.0 / v
            quad = ((x * x).sum(-1, keepdim=True) - 2.0 * a * (x @ p.means.T) + (a * a) * (p.means * p.means).sum(-1)) * iv
            logits = p.log_w - 0.5 * (quad + d * torch.log(v) + d * _LOG_2PI)
            r, out = self._normalise(logits, want)
            riv = r * iv
            if need_score:
                out["score"] = a * (riv @ p.means) - x * riv.sum(-1, keepdim=True)
            if need_x0:
                out["x0"] = (s * s) * (riv @ p.means) + (a * x) * (riv * p.var).sum(-1, keepdim=True)
        else:
            # diagonal with per-sample t, or full covariances: (B, K, d) in the eigenbasis of each C_k
            a3 = a if shared else a[:, :, None]
            s3 = s if shared else s[:, :, None]
            if p.U is None:
                z = x[:, None, :] - a3 * p.means  # (B, K, d)
            else:
                z = torch.einsum("bi,kij->bkj", x, p.U) - a3 * p.means_rot
            v = a3 * a3 * p.var + s3 * s3  # (K, d) or (B, K, d)
            iv = 1.0 / v
            ivz = iv * z
            logits = p.log_w - 0.5 * ((z * ivz).sum(-1) + torch.log(v).sum(-1) + d * _LOG_2PI)
            r, out = self._normalise(logits, want)
            if need_score or need_x0:
                rivz = r[:, :, None] * ivz
            if need_score:
                out["score"] = -(rivz.sum(1) if p.U is None else torch.einsum("kij,bkj->bi", p.U, rivz))
            if need_x0:
                corr = (a3 * p.var) * rivz  # r_k a lam_k (z / v) in the eigenbasis
                x0 = r @ p.means + (corr.sum(1) if p.U is None else torch.einsum("kij,bkj->bi", p.U, corr))
                out["x0"] = x0
        if "eps" in want:
            out["eps"] = -s * out["score"]
        return out

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
        var = torch.einsum("i,kij,j->k", u, self.covs, u)
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

    # ------------------------------------------------------------------ denoiser and exact ODE
    def exact_denoiser(self, schedule: NoiseSchedule) -> "ExactGMMDenoiser":
        return ExactGMMDenoiser(self, schedule)

    def exact_ode_solution(self, x_T: Tensor, t_from: float, t_to: float, schedule: NoiseSchedule,
                           rtol: float = 1e-8, atol: float = 1e-8, method: str = "dopri5",
                           return_nfe: bool = False, threads: int | None = -1):
        """The exact PF-ODE map ``x(t_from) -> x(t_to)`` (float64 integration with
        ``odecm.solvers.solve_adaptive`` on the exact denoiser; output in x_T's dtype).

        ``t_to`` may be the clean point (sigma = 0): the ODE is integrated to
        ``sigma_tilde = 1e-6 * min_std`` and that state (divided by alpha) is returned; the neglected
        remainder is ``O(1e-12)`` relative to the mode widths. ``threads``: intra-op threads during
        the solve (default -1: one thread for batches up to 65536 rows, else unchanged; None: unchanged).
        """
        if threads == -1:
            threads = 1 if x_T.shape[0] <= 65536 else None
        with limit_threads(threads):
            return self._exact_ode(x_T, t_from, t_to, schedule, rtol, atol, method, return_nfe)

    def _exact_ode(self, x_T, t_from, t_to, schedule, rtol, atol, method, return_nfe):
        from odecm.solvers import solve_adaptive

        den = self.exact_denoiser(schedule)
        s_to = float(schedule.sigma_tilde(torch.tensor(float(t_to), dtype=torch.float64)))
        s_floor = 1e-6 * self.min_std()
        if s_to < s_floor:
            t_end = float(schedule.t_from_sigma_tilde(torch.tensor(s_floor, dtype=torch.float64)))
            x, nfe = solve_adaptive(den, x_T, t_from, t_end, method=method, rtol=rtol, atol=atol)
            a_end = float(schedule.alpha(torch.tensor(t_end, dtype=torch.float64)))
            a_to = float(schedule.alpha(torch.tensor(float(t_to), dtype=torch.float64)))
            x = (x.to(torch.float64) * (a_to / a_end)).to(x_T.dtype)
        else:
            x, nfe = solve_adaptive(den, x_T, t_from, t_to, method=method, rtol=rtol, atol=atol)
        return (x, nfe) if return_nfe else x


class ExactGMMDenoiser(Denoiser):
    """The Bayes-optimal denoiser of a ``GaussianMixture``: ``x0_hat = E[x0 | x_t]``,
    ``eps_hat = -sigma grad log p_t`` (both computed directly, so ``eps_hat`` has no
    ``(x - alpha x0_hat) / sigma`` cancellation at small sigma; they agree with ``from_x0``)."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.gmm = gmm

    def forward(self, x, t, cond=None):
        return self.gmm.denoise(x, t, self.schedule)


# ====================================================================== presets
def _ring(n: int, radius: float, phase: float = 0.0) -> Tensor:
    ang = phase + 2.0 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)


def _rotation2(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _preset_ring8(n_modes: int = 8, radius: float = 1.0, std: float = 0.1):
    return torch.full((n_modes,), 1.0 / n_modes), _ring(n_modes, radius), torch.full((n_modes,), std**2)


def _preset_grid25(n_side: int = 5, spacing: float = 0.5, std: float = 0.08):
    c = (torch.arange(n_side, dtype=torch.float64) - (n_side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(c, c, indexing="xy")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    K = means.shape[0]
    return torch.full((K,), 1.0 / K), means, torch.full((K,), std**2)


def _preset_twoscale(n_outer: int = 4, n_inner: int = 4, outer_radius: float = 1.5, outer_std: float = 0.2,
                     inner_radius: float = 0.2, inner_std: float = 0.02):
    means = torch.cat([_ring(n_outer, outer_radius), _ring(n_inner, inner_radius, phase=math.pi / n_inner)])
    var = torch.cat([torch.full((n_outer,), outer_std**2), torch.full((n_inner,), inner_std**2)])
    w = torch.cat([torch.full((n_outer,), 0.5 / n_outer), torch.full((n_inner,), 0.5 / n_inner)])
    return w, means, var


def _preset_imbalanced(n_modes: int = 8, radius: float = 1.0, std: float = 0.1, ratio: float = 0.6):
    w = ratio ** torch.arange(n_modes, dtype=torch.float64)
    return w / w.sum(), _ring(n_modes, radius), torch.full((n_modes,), std**2)


def _preset_aniso(n_modes: int = 6, radius: float = 1.0, std_major: float = 0.25, std_minor: float = 0.03,
                  tilt: float = math.pi / 4):
    means = _ring(n_modes, radius)
    ang = 2.0 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes + tilt
    R = _rotation2(ang)
    D = torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=torch.float64))
    covs = R @ D @ R.transpose(-1, -2)
    return torch.full((n_modes,), 1.0 / n_modes), means, covs


PRESETS = {
    "ring8": _preset_ring8,
    "grid25": _preset_grid25,
    "twoscale": _preset_twoscale,
    "imbalanced": _preset_imbalanced,
    "aniso": _preset_aniso,
    "random": None,  # built in any dimension directly (see make_preset)
}


def _random_orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def make_preset(name: str, dim: int = 2, dtype: torch.dtype = torch.float32, embed: str = "pad",
                noise_std: float | None = None, seed: int = 0, **kw) -> GaussianMixture:
    """Named mixtures, scaled so the per-coordinate data std is ~0.6-0.8 (``data_std()``): unit-ish,
    so SDXL-like schedules (sigma_max ~ 14.6) fully cover the data and sigma_data = 0.5 boundary
    scalings are sensible. Defaults (override any with ``**kw``):

    * ``ring8``: 8 isotropic modes on a circle, ``radius=1, std=0.1`` (data std 0.71).
    * ``grid25``: 5x5 grid, ``spacing=0.5`` centred at 0, ``std=0.08`` (data std 0.71).
    * ``twoscale``: 4 wide modes on a ring ``outer_radius=1.5, outer_std=0.2`` and 4 narrow ones
      ``inner_radius=0.2, inner_std=0.02`` (weights 1/2 per scale; data std 0.77).
    * ``imbalanced``: ring8 with weights ``ratio**k`` normalised (``ratio=0.6``: 0.40 ... 0.011; data std 0.59).
    * ``aniso``: 6 modes on a unit circle, full covariances with stds ``std_major=0.25,
      std_minor=0.03``, the major axis at angle ``theta_k + tilt`` (``tilt=pi/4``).
    * ``random``: ``n_modes=8`` means ``~ spread * N(0, I_dim)`` (``spread=0.7``) drawn with ``seed``,
      isotropic ``std=0.1``; natively ``dim``-dimensional.

    ``dim > 2`` (2D presets): the 2D structure fills the first two coordinates and each extra
    coordinate is independent ``N(0, noise_std^2)`` inside every mode (default ``noise_std`` = the
    mode's own std for isotropic presets, so they stay isotropic; 0.1 for ``aniso``).
    ``embed="rotate"`` then applies a fixed random rotation (from ``seed``) so the structure is not
    axis-aligned (isotropic modes stay isotropic; others become full).
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {sorted(PRESETS)}")
    if dim < 2:
        raise ValueError(f"dim={dim}; allowed: dim >= 2")
    if embed not in ("pad", "rotate"):
        raise ValueError(f"embed={embed!r}; allowed: 'pad', 'rotate'")
    if name == "random":
        n_modes, spread, std = kw.pop("n_modes", 8), kw.pop("spread", 0.7), kw.pop("std", 0.1)
        if kw:
            raise ValueError(f"unknown keys for preset 'random': {sorted(kw)}; allowed: n_modes, spread, std")
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
        return GaussianMixture(torch.full((n_modes,), 1.0 / n_modes), means, torch.full((n_modes,), std**2), dtype=dtype)
    try:
        w, means, covs = PRESETS[name](**kw)
    except TypeError as e:
        import inspect

        allowed = list(inspect.signature(PRESETS[name]).parameters)
        raise ValueError(f"bad keys for preset {name!r}: {sorted(kw)}; allowed: {allowed}") from e
    if dim > 2:
        K, extra = means.shape[0], dim - 2
        means = torch.cat([means, torch.zeros(K, extra, dtype=torch.float64)], -1)
        if covs.dim() == 1 and noise_std is None:
            covs = covs.clone()  # isotropic stays isotropic
        else:
            nv = (0.1 if noise_std is None else noise_std) ** 2
            if covs.dim() == 1:
                covs = torch.cat([covs[:, None].expand(K, 2), torch.full((K, extra), nv, dtype=torch.float64)], -1)
            else:
                full = torch.zeros(K, dim, dim, dtype=torch.float64)
                full[:, :2, :2] = covs
                full[:, 2:, 2:] = nv * torch.eye(extra, dtype=torch.float64)
                covs = full
        if embed == "rotate":
            Q = _random_orthogonal(dim, seed)
            means = means @ Q.T
            if covs.dim() == 2:
                covs = torch.diag_embed(covs)
            if covs.dim() == 3:
                covs = Q @ covs @ Q.T
    return GaussianMixture(w, means, covs, dtype=dtype)
