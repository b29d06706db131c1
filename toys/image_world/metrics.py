"""Sample metrics of the image world (all on decoded pixel images in [-1, 1], float64 reductions).

* ``ode_error(a, b)`` — the paper's E (eq. 6): mean over samples and elements of ``(a - b)^2``.
* ``frechet(f1, f2)`` — Fréchet distance between Gaussian fits of classifier features
  (``odecm.metrics.frechet_distance_features``): the image world's FID.
* ``precision`` / ``recall`` — k-NN manifold estimates (Kynkäänniemi et al. 2019, k = 3) in the same
  feature space (``toys.metrics.prdc``).
* ``class_tv`` — total variation ``1/2 sum_c |h_c - 1/C|`` between the classifier's predicted-class
  histogram ``h`` of the samples and the uniform distribution.
* ``memorisation`` — share of samples whose nearest training image lies within RMS distance
  ``threshold`` (per pixel, in [-1, 1] units): ``min_k sqrt(mean (x - m_k)^2) < threshold``.
* shrinkage — ``covariance_spectrum``: eigenvalues of the pixel covariance of a sample set
  (descending); ``radial_power``: the 2D FFT power ``|F(x)|^2 / (H W)`` averaged over samples and
  channels and binned by integer radial frequency ``round(sqrt(k_x^2 + k_y^2))``. Blur (regression
  to a conditional mean) lowers the high-frequency bins. ``shrinkage`` summarises both against a
  reference set: the total-variance ratio and the ratio of the power in the upper half of the radial
  bins.
"""
from __future__ import annotations

from typing import Any

import torch

from odecm.metrics import frechet_distance_features, per_sample_sq_error
from toys import metrics as toys_metrics
from toys.metrics import prdc

Tensor = torch.Tensor

__all__ = ["ode_error", "frechet", "class_histogram", "class_tv", "nearest_distance", "memorisation",
           "covariance_spectrum", "radial_power", "shrinkage", "feature_metrics"]


def ode_error(a: Tensor, b: Tensor) -> float:
    """``mean_{samples, elements} (a - b)^2`` (paper eq. 6)."""
    return float(per_sample_sq_error(a, b).mean())


def frechet(f1: Tensor, f2: Tensor) -> float:
    return frechet_distance_features(f1.double(), f2.double())


def class_histogram(pred: Tensor, num_classes: int) -> Tensor:
    """Share of samples per predicted class ``(C,)``."""
    return torch.bincount(pred.reshape(-1).long(), minlength=num_classes).double() / max(pred.numel(), 1)


def class_tv(pred: Tensor, num_classes: int) -> float:
    """``1/2 sum_c |h_c - 1/C|``: 0 for a uniform class histogram, ``1 - 1/C`` for a single class."""
    return float(0.5 * (class_histogram(pred, num_classes) - 1.0 / num_classes).abs().sum())


def nearest_distance(x: Tensor, train: Tensor, chunk: int = 1024) -> Tensor:
    """Per sample, the RMS distance ``min_k sqrt(mean (x - m_k)^2)`` to the nearest training image (float64)."""
    a = x.reshape(x.shape[0], -1).double()
    b = train.reshape(train.shape[0], -1).double()
    b2 = (b * b).sum(1)
    out = []
    for i in range(0, a.shape[0], chunk):
        ai = a[i:i + chunk]
        d2 = ((ai * ai).sum(1, keepdim=True) - 2.0 * ai @ b.T + b2).clamp(min=0)
        out.append(torch.sqrt(d2.min(1).values / a.shape[1]))
    return torch.cat(out)


def memorisation(x: Tensor, train: Tensor, threshold: float) -> float:
    """Share of samples within RMS distance ``threshold`` of a training image."""
    return float((nearest_distance(x, train) < threshold).double().mean())


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def covariance_spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the pixel covariance of ``x (n, ...)``, descending (float64; ``toys.metrics.covariance_spectrum``
    of the flattened samples)."""
    return toys_metrics.covariance_spectrum(_flat(x))


def radial_power(x: Tensor) -> Tensor:
    """Mean 2D FFT power per integer radial frequency (see module docstring), ``(R,)`` float64."""
    x = x.double()
    H, W = x.shape[-2:]
    power = (torch.fft.fft2(x).abs() ** 2 / (H * W)).mean(dim=tuple(range(x.dim() - 2)))
    ky = torch.fft.fftfreq(H, d=1.0 / H).abs()
    kx = torch.fft.fftfreq(W, d=1.0 / W).abs()
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long()
    R = int(radius.max()) + 1
    total = torch.zeros(R, dtype=torch.float64).index_add_(0, radius.reshape(-1), power.reshape(-1))
    count = torch.zeros(R, dtype=torch.float64).index_add_(0, radius.reshape(-1), torch.ones(H * W, dtype=torch.float64))
    return total / count


def shrinkage(x: Tensor, reference: Tensor) -> dict[str, float]:
    """``variance_ratio`` = trace Cov(x) / trace Cov(ref); ``hf_power_ratio`` = power of x in the upper half of
    the radial frequency bins (excluding DC) over the reference's."""
    px, pr = radial_power(x), radial_power(reference)
    hi = slice(max(1, (px.numel() + 1) // 2), None)
    return {"variance_ratio": toys_metrics.total_variance_ratio(_flat(x), _flat(reference)),
            "hf_power_ratio": float(px[hi].sum() / pr[hi].sum())}


def feature_metrics(feats: Tensor, ref_feats: Tensor, suffix: str, k: int = 3) -> dict[str, Any]:
    """``fd_<suffix>``, ``precision_<suffix>``, ``recall_<suffix>`` of sample features against reference features."""
    pr = prdc(feats.double(), ref_feats.double(), k=k)
    return {f"fd_{suffix}": frechet(feats, ref_feats), f"precision_{suffix}": float(pr["precision"]),
            f"recall_{suffix}": float(pr["recall"])}
