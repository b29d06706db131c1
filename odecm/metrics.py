"""Metrics shared by the toys and SDXL.

* ``ode_error`` — the paper's eq. 6: mean squared error between the student's output and the
  teacher solver's solution from the same initial noise, averaged over samples and elements.
* ``frechet_distance`` — ``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2})`` between two
  Gaussians (FID, FD-DINO), computed in float64 through symmetric eigendecompositions, which is
  stabler than a general matrix square root of ``C1 C2``.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["ode_error", "per_sample_sq_error", "feature_stats", "frechet_distance", "frechet_distance_features"]


def per_sample_sq_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean over non-batch elements of ``(a - b)^2``, one value per sample (float64)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a.double() - b.double()) ** 2
    return d.reshape(d.shape[0], -1).mean(dim=1)


def ode_error(student_out: Tensor, solver_out: Tensor) -> float:
    """E = mean_{samples, elements} (f_theta(x_T, T) - f_solver(x_T, T, 0))^2 (paper eq. 6)."""
    return float(per_sample_sq_error(student_out, solver_out).mean())


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of an ``(n, d)`` feature matrix."""
    f = features.double().reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 feature vectors for a covariance")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def _sqrtm_psd(c: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    r1 = _sqrtm_psd(cov1)
    inner = r1 @ cov2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def frechet_distance_features(f1: Tensor, f2: Tensor) -> float:
    """Frechet distance between the Gaussian fits of two feature sets ``(n1, d)``, ``(n2, d)``.

    With few samples (``max(n1, n2) <= d``, e.g. 2048-d Inception features of a few hundred images)
    it uses the exact low-rank form: with centred features ``A_i`` and ``C_i = A_i^T A_i / (n_i - 1)``,
    the nonzero eigenvalues of ``C1^{1/2} C2 C1^{1/2}`` are those of ``C2 C1``, i.e. the squared
    singular values of ``A2 A1^T / sqrt((n1-1)(n2-1))``, so
    ``FD = |mu1 - mu2|^2 + |A1|_F^2/(n1-1) + |A2|_F^2/(n2-1) - 2 sum_j s_j(A2 A1^T) / sqrt((n1-1)(n2-1))``
    (an n1 x n2 SVD instead of d x d eigendecompositions). Otherwise the covariance form. float64."""
    n1, n2 = f1.shape[0], f2.shape[0]
    a1, a2 = f1.double().reshape(n1, -1), f2.double().reshape(n2, -1)
    if max(n1, n2) > a1.shape[1]:
        return frechet_distance(*feature_stats(a1), *feature_stats(a2))
    if min(n1, n2) < 2:
        raise ValueError("need at least 2 feature vectors per set")
    mu1, mu2 = a1.mean(0), a2.mean(0)
    a1, a2 = a1 - mu1, a2 - mu2
    tr_sqrt = torch.linalg.svdvals(a2 @ a1.T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    return float(((mu1 - mu2) ** 2).sum() + (a1**2).sum() / (n1 - 1) + (a2**2).sum() / (n2 - 1) - 2 * tr_sqrt)
