"""Evaluation kernels of ``toys.gmm``: log p_t, responsibilities, score and E[x0|x_t] of a mixture, one row block at a time.

For ``p_t = sum_k w_k N(alpha m_k, V_k)`` with ``V_k = alpha^2 C_k + sigma^2 I`` (stored in the
eigenbasis of ``C_k``), ``d_k = x - alpha m_k`` and ``r_k = softmax_k(log w_k + log N_k(x))``:

    score  = -sum_k r_k V_k^{-1} d_k
    x0_hat = sum_k r_k (m_k + alpha C_k V_k^{-1} d_k)
    eps    = -sigma score

Four paths, chosen by covariance type and whether the batch shares one time:

* ``empirical`` (every ``C_k = 0``, e.g. the empirical distribution of a data set, K in the
  thousands): ``V_k = sigma^2 I`` for all k, so ``x0_hat = r @ M`` and ``eps = (x - alpha x0_hat) / sigma``:
  two ``(B, d) x (d, K)`` matmuls per call, shared or per-sample time. Needs ``sigma > 0``.
* isotropic / diagonal with a shared time: ``log N_k`` is linear in the features ``[x, x*x]``, so the
  logits are one matmul and the responsibility-weighted sums another.
* isotropic with per-sample times: ``(B, K)`` quadratic forms from ``x @ M^T``.
* diagonal with per-sample times, or full covariances: ``(B, K, d)`` in each eigenbasis.

``GaussianMixture._evaluate`` calls ``evaluate_block`` on row blocks of about ``block_elements / K``
rows, so the ``(rows, K)`` temporaries stay bounded (a few MB) however large the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from odecm.schedules import NoiseSchedule

Tensor = torch.Tensor

__all__ = ["LOG_2PI", "MixtureParams", "noise_coefficients", "normalise", "evaluate_block"]

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class MixtureParams:
    """A mixture's parameters cast to one (device, dtype)."""

    log_w: Tensor  # (K,)
    means: Tensor  # (K, d)
    var: Tensor  # isotropic (K,), diagonal/full eigenvalues (K, d)
    U: Tensor | None  # full only: (K, d, d), columns are eigenvectors
    means_rot: Tensor | None  # full only: U_k^T m_k, (K, d)
    cov_type: str  # "isotropic" | "diagonal" | "full" | "empirical" (all variances zero)
    mean_sq: Tensor | None = None  # empirical only: |m_k|^2, (K,)


def noise_coefficients(x: Tensor, t: Any, schedule: NoiseSchedule | None) -> tuple[Tensor, Tensor]:
    """alpha, sigma as 0-dim tensors (shared time) or ``(B, 1)`` (per-sample), in x's dtype.
    ``t=None`` is the clean data (alpha = 1, sigma = 0). A per-sample ``t`` whose entries are all
    equal takes the shared-time fast path."""
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


def normalise(logits: Tensor, want: set[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Responsibilities ``r = softmax(logits)`` (torch's fused, stable kernel) and, when wanted,
    ``out['logp'] = logsumexp(logits)`` and ``out['resp'] = r``."""
    out: dict[str, Tensor] = {}
    if "logp" in want:
        out["logp"] = torch.logsumexp(logits, dim=-1)
    r = torch.softmax(logits, dim=-1)
    if "resp" in want:
        out["resp"] = r
    return r, out


def _empirical(p: MixtureParams, x: Tensor, a: Tensor, s: Tensor, want: set[str]) -> dict[str, Tensor]:
    """All ``C_k = 0``: ``log N_k = -(|x|^2 - 2 alpha x.m_k + alpha^2 |m_k|^2) / (2 sigma^2) - d log sigma - d/2 log 2 pi``."""
    if bool((s <= 0).any()):
        raise ValueError("a mixture with zero-variance components has no density at sigma = 0; evaluate at t > t_clean")
    d = x.shape[1]
    iv = 1.0 / (s * s)
    const = -0.5 * (x * x).sum(-1, keepdim=True) * iv - d * torch.log(s) - 0.5 * d * LOG_2PI  # (B, 1) or (1,)
    logits = (a * iv) * (x @ p.means.T) - (0.5 * a * a * iv) * p.mean_sq + p.log_w + const
    r, out = normalise(logits, want)
    if want & {"score", "eps", "x0"}:
        x0 = r @ p.means
        if "x0" in want:
            out["x0"] = x0
        resid = x - a * x0  # sigma eps_hat
        if "score" in want:
            out["score"] = -resid * iv
        if "eps" in want:
            out["eps"] = resid / s
    return out


def evaluate_block(p: MixtureParams, x: Tensor, a: Tensor, s: Tensor, want: set[str]) -> dict[str, Tensor]:
    """``want`` is a subset of {logp, resp, score, x0, eps}; ``a, s`` from ``noise_coefficients``."""
    if p.cov_type == "empirical":
        return _empirical(p, x, a, s, want)
    d = x.shape[1]
    shared = a.dim() == 0
    need_score = bool(want & {"score", "eps"})
    need_x0 = "x0" in want
    if p.cov_type != "full" and shared:
        # log N_k(x) is linear in the features [x, x*x]: logits = [x, x*x] @ W + c (one matmul);
        # sums over k of r_k * (per-k row) are one more matmul.
        var = p.var[:, None].expand(-1, d) if p.cov_type == "isotropic" else p.var  # (K, d)
        v = a * a * var + s * s
        iv = 1.0 / v
        miv = p.means * iv
        W = torch.cat([(a * miv).T, (-0.5 * iv).T], 0)  # (2d, K)
        c = p.log_w - 0.5 * ((a * a) * (p.means * miv).sum(-1) + torch.log(v).sum(-1) + d * LOG_2PI)
        logits = torch.addmm(c, torch.cat([x, x * x], -1), W)
        r, out = normalise(logits, want)
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
    elif p.cov_type == "isotropic":
        # per-sample t: v is (B, K)
        v = a * a * p.var + s * s
        iv = 1.0 / v
        quad = ((x * x).sum(-1, keepdim=True) - 2.0 * a * (x @ p.means.T) + (a * a) * (p.means * p.means).sum(-1)) * iv
        logits = p.log_w - 0.5 * (quad + d * torch.log(v) + d * LOG_2PI)
        r, out = normalise(logits, want)
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
        logits = p.log_w - 0.5 * ((z * ivz).sum(-1) + torch.log(v).sum(-1) + d * LOG_2PI)
        r, out = normalise(logits, want)
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
