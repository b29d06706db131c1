"""Sample quality of a point set ``x`` (n, d) against a reference set ``y`` (m, d) and, optionally, the
true data mixture ``p_0`` (a ``toys.gmm.GaussianMixture``).

All reductions run in float64 on CPU. Metrics (lower is better unless marked ^):

* ``w2`` — exact 2-Wasserstein distance between the two empirical measures (uniform weights):
  ``W2 = sqrt(min_P sum_ij P_ij |x_i - y_j|^2)`` via POT's network simplex (``ot.emd2``).
* ``sliced_w2`` — ``sqrt(mean_u W2^2(u^T x, u^T y))`` over ``num_projections`` directions ``u`` uniform
  on the sphere (drawn from the seed); each 1D W2 is exact (quantile functions).
* ``mmd2`` — unbiased MMD^2 (Gretton et al. 2012) with the kernel
  ``k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2))`` over the bandwidths ``h`` in ``MMD_BANDWIDTHS``
  (0.05, 0.1, 0.2, 0.5, 1, 2: in data units, for data of per-coordinate std ~0.7 with modes of std
  ~0.1). Equal sizes use the U-statistic over pairs i != j of ``h = k(x_i,x_j) + k(y_i,y_j) -
  k(x_i,y_j) - k(x_j,y_i)`` (zero for identical sets); unequal sizes the two-sample unbiased form.
  It can be slightly negative.
* ``precision`` ^, ``recall`` ^ (Kynkaanniemi et al. 2019), ``density`` ^, ``coverage`` ^ (Naeem
  et al. 2020) with k-NN balls (``k = 3``): ``r_i`` = distance of reference point ``y_i`` to its k-th
  nearest other reference point, ``r'_j`` likewise within ``x``:
  precision = mean_j [exists i: |x_j - y_i| <= r_i];  recall = mean_i [exists j: |y_i - x_j| <= r'_j];
  density = (1 / (k n)) sum_j #{i: |x_j - y_i| <= r_i};  coverage = mean_i [min_j |y_i - x_j| <= r_i].
* with ``gmm``: each sample is assigned to the component of largest ``w_k N_k(x)`` (its mode);
  ``mode_precision`` ^ = fraction of samples inside their mode's ball, Mahalanobis
  ``sqrt((x - m_k)^T C_k^{-1} (x - m_k)) <= r_d`` with the dimension-aware radius
  ``r_d = sqrt(chi2_d^{-1}(MODE_MASS))``: the radius holding the mass ``MODE_MASS = P(|z| <= 3) = 0.9973``
  of a 1D 3-sigma interval under ``N(m_k, C_k)`` in d dimensions (r_1 = 3, r_2 = 3.44, r_64 = 9.9,
  r_256 = 17.9; a fixed 3 would reject nearly every exact sample at d = 64, where ``|z| ~ sqrt(d) = 8``).
  Exact samples therefore score ~0.997 in any dimension; ``std_threshold`` fixes the radius instead.
  A mode is covered when it receives at least ``coverage_fraction`` = 0.1 of its expected count ``w_k n``
  of such samples; ``modes_covered`` ^ = fraction of modes covered; ``mode_tv`` =
  ``1/2 sum_k |n_k / n - w_k|`` (n_k: samples assigned to mode k); ``nll`` = ``-mean log p_0(x)`` (nats).
* shrinkage (``shrinkage=True`` in ``sample_quality``): ``variance_ratio`` = ``tr(C_x) / tr(C_ref)`` (target
  1; < 1 when samples are pulled toward a conditional mean, as plain L2 regression onto a deterministic
  map does). ``covariance_spectrum`` / ``spectrum_ratio`` give the sorted eigenvalues and their
  rank-by-rank ratio to the reference.

``per_sample_quality`` gives the per-sample terms whose means are ``precision``, ``density``,
``mode_precision`` and ``nll``, for bootstrap intervals over evaluation samples (``studies.stats``).

The O(n^2) metrics (w2, mmd2, k-NN) use at most ``max_points`` points of each set, chosen by a seeded
permutation; everything is deterministic given ``seed``. ``finite_sample_floor`` gives the same dict
between two independent reference sets: the value a perfect sampler gets at this sample size.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = [
    "MMD_BANDWIDTHS",
    "HIGHER_IS_BETTER",
    "wasserstein2",
    "sliced_wasserstein2",
    "mmd2_unbiased",
    "prdc",
    "MODE_MASS",
    "TARGET_ONE",
    "mode_radius",
    "mode_statistics",
    "negative_log_likelihood",
    "covariance_spectrum",
    "spectrum_ratio",
    "total_variance_ratio",
    "per_sample_quality",
    "sample_quality",
    "finite_sample_floor",
    "quality_table",
]

MMD_BANDWIDTHS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
HIGHER_IS_BETTER = {"precision", "recall", "density", "coverage", "mode_precision", "modes_covered"}
TARGET_ONE = {"variance_ratio"}  # neither lower nor higher: 1 is a perfect sampler
MODE_MASS = math.erf(3.0 / math.sqrt(2.0))  # P(|z| <= 3), z ~ N(0, 1): the 1D 3-sigma mass, 0.99730


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances without the matrix-product shortcut (no cancellation: d(x, x) = 0 exactly)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _f64(x: Any) -> Tensor:
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"point sets must have shape (n, d), got {tuple(x.shape)}")
    return x


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("need at least 2 points in each set")


# ------------------------------------------------------------------ optimal transport
def wasserstein2(x: Tensor, y: Tensor, num_iter_max: int = 10_000_000) -> float:
    """Exact W2 between the uniform empirical measures of ``x`` (n, d) and ``y`` (m, d)."""
    import ot

    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    cost = _dist(x, y).pow(2).numpy()
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    w2_sq = float(ot.emd2(a, b, cost, numItermax=num_iter_max))
    return math.sqrt(max(w2_sq, 0.0))


def _w2_sq_1d(u: Tensor, v: Tensor) -> Tensor:
    """Exact squared W2 between 1D uniform empirical measures, column by column: ``u`` (n, P), ``v`` (m, P).
    ``int_0^1 (F_u^{-1}(q) - F_v^{-1}(q))^2 dq`` over the merged breakpoints of both quantile functions."""
    n, m = u.shape[0], v.shape[0]
    us, vs = u.sort(dim=0).values, v.sort(dim=0).values
    if n == m:
        return ((us - vs) ** 2).mean(0)
    levels = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                     torch.arange(1, m + 1, dtype=torch.float64) / m]))
    widths = torch.diff(levels, prepend=torch.zeros(1, dtype=torch.float64))
    mid = levels - widths / 2
    iu = torch.clamp(torch.ceil(mid * n).long() - 1, 0, n - 1)
    iv = torch.clamp(torch.ceil(mid * m).long() - 1, 0, m - 1)
    return (widths[:, None] * (us[iu] - vs[iv]) ** 2).sum(0)


def sliced_wasserstein2(x: Tensor, y: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """``sqrt(mean_u W2^2(u^T x, u^T y))`` with ``num_projections`` directions from ``seed``."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    g = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    return math.sqrt(float(_w2_sq_1d(x @ dirs, y @ dirs).mean()))


# ------------------------------------------------------------------ MMD
def _kernel(a: Tensor, b: Tensor, bandwidths: Sequence[float]) -> Tensor:
    d2 = _dist(a, b).pow_(2)
    out = torch.zeros_like(d2)
    tmp = torch.empty_like(d2)
    for h in bandwidths:
        out += torch.exp(torch.mul(d2, -1.0 / (2.0 * h * h), out=tmp), out=tmp)
    return out.div_(len(bandwidths))


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidths: Sequence[float] = MMD_BANDWIDTHS) -> float:
    """Unbiased MMD^2 with the multi-bandwidth RBF kernel (see the module docstring)."""
    x, y = _f64(x), _f64(y)
    _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _kernel(x, x, bandwidths), _kernel(y, y, bandwidths), _kernel(x, y, bandwidths)
    off = lambda k: (k.sum() - torch.diagonal(k).sum()) / (k.shape[0] * (k.shape[0] - 1))  # noqa: E731
    if n == m:  # U-statistic over pairs i != j (Gretton et al. 2012, eq. 3)
        cross = (kxy.sum() - torch.diagonal(kxy).sum()) / (n * (n - 1))
        return float(off(kxx) + off(kyy) - 2.0 * cross)
    return float(off(kxx) + off(kyy) - 2.0 * kxy.mean())


# ------------------------------------------------------------------ k-NN precision / recall / density / coverage
def _knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest *other* point of the same set."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(points)
    dist, _ = nn.kneighbors(points)
    return dist[:, -1]


def _prdc_terms(x: Tensor, y: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample: number of reference k-NN balls containing it; per reference point: recalled (inside
    some sample ball), distance to the nearest sample, and its own k-NN radius."""
    _check_pair(x, y)
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"need more than k={k} points in each set")
    r_ref = torch.from_numpy(_knn_radii(y.numpy(), k))
    r_x = torch.from_numpy(_knn_radii(x.numpy(), k))
    inside_count = torch.zeros(x.shape[0], dtype=torch.float64)
    recalled = torch.zeros(y.shape[0], dtype=torch.bool)
    nearest_sample = torch.full((y.shape[0],), float("inf"), dtype=torch.float64)
    for lo in range(0, y.shape[0], chunk):
        d = _dist(y[lo:lo + chunk], x)  # (chunk, n)
        inside_count += (d <= r_ref[lo:lo + chunk, None]).sum(0)
        recalled[lo:lo + chunk] = (d <= r_x[None, :]).any(1)
        nearest_sample[lo:lo + chunk] = d.min(1).values
    return inside_count, recalled, nearest_sample, r_ref


def prdc(x: Tensor, reference: Tensor, k: int = 3, chunk: int = 2048) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of samples ``x`` against ``reference``."""
    x, y = _f64(x), _f64(reference)
    inside_count, recalled, nearest_sample, r_ref = _prdc_terms(x, y, k, chunk)
    return {
        "precision": float((inside_count > 0).double().mean()),
        "recall": float(recalled.double().mean()),
        "density": float(inside_count.sum() / (k * x.shape[0])),
        "coverage": float((nearest_sample <= r_ref).double().mean()),
    }


# ------------------------------------------------------------------ mixture-based statistics
def mode_radius(dim: int, mass: float = MODE_MASS) -> float:
    """Mahalanobis radius holding ``mass`` of a d-dimensional Gaussian: ``sqrt(chi2_d^{-1}(mass))``
    (|z| of z ~ N(0, I_d) follows the chi distribution with d degrees of freedom)."""
    from scipy.stats import chi2

    if not 0.0 < mass < 1.0:
        raise ValueError(f"mode_mass={mass}; allowed: 0 < mode_mass < 1")
    return math.sqrt(float(chi2.ppf(mass, int(dim))))


def mode_statistics(x: Tensor, gmm: Any, std_threshold: float | None = None, coverage_fraction: float = 0.1,
                    mode_mass: float = MODE_MASS) -> dict[str, Any]:
    """Mode assignment (largest ``w_k N_k(x)``), Mahalanobis distance to the mode, and the derived statistics.

    A sample is *good* when its Mahalanobis distance to its mode is at most ``radius`` =
    ``mode_radius(d, mode_mass)`` (``std_threshold`` given: that fixed radius). Returns floats
    ``mode_precision``, ``modes_covered``, ``mode_tv``, ``radius`` and float64 tensors ``counts`` (samples
    per mode), ``good_counts``, ``expected`` (``w_k n``), ``per_mode_precision`` (good / assigned, NaN for
    empty modes), ``covered`` (bool), and per sample ``mode`` (index), ``mahalanobis`` and ``good`` (bool)."""
    x = _f64(x)
    n, d = x.shape
    radius = float(std_threshold) if std_threshold is not None else mode_radius(d, mode_mass)
    weights = torch.as_tensor(gmm.weights, dtype=torch.float64)
    means = torch.as_tensor(gmm.means, dtype=torch.float64)
    K = means.shape[0]
    mode = gmm.component_log_probs(x).argmax(-1).cpu()
    maha = torch.empty(n, dtype=torch.float64)
    if getattr(gmm, "cov_type", "full") in ("isotropic", "diagonal"):  # no factorisation needed
        var = torch.as_tensor(gmm.component_variances, dtype=torch.float64)
        var = var[:, None].expand(K, d) if var.dim() == 1 else var
        for k in mode.unique().tolist():
            idx = mode == k
            q = (x[idx] - means[k]).pow(2) / var[k]
            maha[idx] = torch.nan_to_num(q, nan=0.0).sum(1).sqrt()  # 0 / 0 on a point mass: on the mode
    else:
        chol = torch.linalg.cholesky(torch.as_tensor(gmm.covs, dtype=torch.float64))  # (K, d, d)
        for k in mode.unique().tolist():  # one triangular solve per mode, not an (n, d, d) stack
            idx = mode == k
            z = torch.linalg.solve_triangular(chol[k], (x[idx] - means[k]).T, upper=False)
            maha[idx] = z.norm(dim=0)
    good = maha <= radius
    counts = torch.bincount(mode, minlength=K).double()
    good_counts = torch.bincount(mode[good], minlength=K).double()
    expected = weights * n
    covered = good_counts >= coverage_fraction * expected
    return {
        "mode_precision": float(good.double().mean()),
        "modes_covered": float(covered.double().mean()),
        "mode_tv": float(0.5 * (counts / n - weights).abs().sum()),
        "radius": radius,
        "counts": counts,
        "good_counts": good_counts,
        "expected": expected,
        "per_mode_precision": torch.where(counts > 0, good_counts / counts.clamp(min=1), torch.nan),
        "covered": covered,
        "mode": mode,
        "mahalanobis": maha,
        "good": good,
    }


def negative_log_likelihood(x: Tensor, gmm: Any) -> float:
    """``-mean_i log p_0(x_i)`` under the true mixture (nats, float64)."""
    return float(-gmm.log_prob(_f64(x)).mean())


# ------------------------------------------------------------------ shrinkage: covariance spectra
def covariance_spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the sample covariance ``C_x = (x - xbar)^T (x - xbar) / (n - 1)``, sorted descending
    (float64, (d,); round-off negatives clipped to 0)."""
    x = _f64(x)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 points for a covariance")
    xc = x - x.mean(0)
    cov = xc.T @ xc / (x.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp(min=0.0)


def spectrum_ratio(x: Tensor, reference: Tensor, rel_eps: float = 1e-10) -> Tensor:
    """Rank-by-rank ratio ``lambda_i(C_x) / lambda_i(C_ref)`` of the sorted spectra (i = 1 largest).

    Rank matching compares the spread along each set's own principal axes, not along shared directions.
    Ranks whose reference eigenvalue is ``<= rel_eps * lambda_1(C_ref)`` (e.g. beyond ``n_ref - 1``) are NaN.
    A sample set that is the reference scaled by ``s`` has every ratio ``s^2``."""
    x, y = _f64(x), _f64(reference)
    _check_pair(x, y)
    lx, ly = covariance_spectrum(x), covariance_spectrum(y)
    return torch.where(ly > rel_eps * ly[0], lx / ly.clamp(min=torch.finfo(torch.float64).tiny), torch.nan)


def total_variance_ratio(x: Tensor, reference: Tensor) -> float:
    """``tr(C_x) / tr(C_ref)``: total variance of the samples over that of the reference (1: no shrinkage)."""
    x, y = _f64(x), _f64(reference)
    _check_pair(x, y)
    return float(x.var(0, unbiased=True).sum() / y.var(0, unbiased=True).sum())


# ------------------------------------------------------------------ per-sample terms (for bootstraps)
def per_sample_quality(x: Tensor, reference: Tensor | None = None, gmm: Any = None, k: int = 3,
                       std_threshold: float | None = None, mode_mass: float = MODE_MASS,
                       chunk: int = 2048) -> dict[str, Tensor]:
    """Per-sample terms (float64, (n,)) whose means are set metrics of ``sample_quality`` on the same sets:

    with ``reference``: ``precision`` (1 if inside some reference k-NN ball) and ``density``
    (``#{i: |x_j - y_i| <= r_i} / k``); with ``gmm``: ``mode_good`` (1 if inside its mode's ball; mean =
    ``mode_precision``) and ``nll`` (``-log p_0(x_j)``). Pass the sets ``sample_quality`` used (it
    subsamples k-NN metrics to ``max_points``) to reproduce its values exactly."""
    x = _f64(x)
    out: dict[str, Tensor] = {}
    if reference is not None:
        inside_count = _prdc_terms(x, _f64(reference), k, chunk)[0]
        out["precision"] = (inside_count > 0).double()
        out["density"] = inside_count / k
    if gmm is not None:
        out["mode_good"] = mode_statistics(x, gmm, std_threshold, mode_mass=mode_mass)["good"].double()
        out["nll"] = -gmm.log_prob(x).to(torch.float64).cpu()
    if not out:
        raise ValueError("pass a reference set, a gmm, or both")
    return out


# ------------------------------------------------------------------ everything at once
def _subsample(x: Tensor, max_points: int | None, g: torch.Generator) -> Tensor:
    if max_points is None or x.shape[0] <= max_points:
        return x
    return x[torch.randperm(x.shape[0], generator=g)[:max_points]]


def sample_quality(
    x: Tensor,
    reference: Tensor,
    gmm: Any = None,
    seed: int = 0,
    max_points: int | None = 2000,
    k: int = 3,
    num_projections: int = 256,
    bandwidths: Sequence[float] = MMD_BANDWIDTHS,
    std_threshold: float | None = None,
    coverage_fraction: float = 0.1,
    mode_mass: float = MODE_MASS,
    shrinkage: bool = False,
) -> dict[str, float]:
    """All metrics of the module docstring as a dict of floats, deterministic given ``seed``.

    ``w2``, ``mmd2`` and the k-NN metrics use a seeded subsample of at most ``max_points`` points of
    each set (``None``: all); ``sliced_w2``, the mixture statistics and ``variance_ratio`` (only with
    ``shrinkage=True``) use every point. Mode balls: radius ``mode_radius(d, mode_mass)``, or
    ``std_threshold`` when given (the fixed radius of earlier versions was 3)."""
    x, y = _f64(x), _f64(reference)
    _check_pair(x, y)
    g = torch.Generator().manual_seed(int(seed))
    xs, ys = _subsample(x, max_points, g), _subsample(y, max_points, g)
    out = {
        "w2": wasserstein2(xs, ys),
        "sliced_w2": sliced_wasserstein2(x, y, num_projections, seed=seed),
        "mmd2": mmd2_unbiased(xs, ys, bandwidths),
        **prdc(xs, ys, k=k),
    }
    if gmm is not None:
        stats = mode_statistics(x, gmm, std_threshold, coverage_fraction, mode_mass)
        out.update({key: stats[key] for key in ("mode_precision", "modes_covered", "mode_tv")})
        out["nll"] = negative_log_likelihood(x, gmm)
    if shrinkage:
        out["variance_ratio"] = total_variance_ratio(x, y)
    return out


def finite_sample_floor(
    reference_sampler: Callable[[int, torch.Generator], Tensor] | Any = None,
    num_samples: int | None = None,
    reference_a: Tensor | None = None,
    reference_b: Tensor | None = None,
    gmm: Any = None,
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """``sample_quality`` between two independent reference sets of the same size: the floor.

    Either pass the two sets (``reference_a``, ``reference_b``) or a sampler and ``num_samples``: a
    callable ``(n, generator) -> (n, d)`` or an object with ``sample_p0(n, generator)`` (a
    ``GaussianMixture``, which then also serves as ``gmm`` unless one is given). The two sets are drawn
    with generators seeded ``seed + 1`` and ``seed + 2``."""
    if reference_a is None or reference_b is None:
        if reference_sampler is None or num_samples is None:
            raise ValueError("pass reference_a and reference_b, or reference_sampler and num_samples")
        if hasattr(reference_sampler, "sample_p0"):
            gmm = reference_sampler if gmm is None else gmm
            mixture = reference_sampler
            draw = lambda n, gen: mixture.sample_p0(n, generator=gen, dtype=torch.float64)[0]  # noqa: E731
        else:
            draw = reference_sampler
        reference_a = draw(num_samples, torch.Generator().manual_seed(int(seed) + 1))
        reference_b = draw(num_samples, torch.Generator().manual_seed(int(seed) + 2))
    return sample_quality(reference_a, reference_b, gmm=gmm, seed=seed, **kwargs)


def quality_table(metrics: dict[str, float], floor: dict[str, float] | None = None) -> str:
    """A markdown table ``metric | value | floor | better`` (floor from ``finite_sample_floor``)."""
    lines = ["| metric | value | floor | better |", "|---|---|---|---|"]
    for key, value in metrics.items():
        fl = "" if floor is None or key not in floor else f"{floor[key]:.4g}"
        better = "closer to 1" if key in TARGET_ONE else "higher" if key in HIGHER_IS_BETTER else "lower"
        lines.append(f"| {key} | {value:.4g} | {fl} | {better} |")
    return "\n".join(lines)
