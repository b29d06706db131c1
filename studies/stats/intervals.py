"""Intervals: paired t-intervals over seeds, bootstrap intervals over evaluation samples, and floors as
distributions."""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy import stats as sps

__all__ = [
    "PairedDifference",
    "paired_difference",
    "BootstrapInterval",
    "bootstrap_interval",
    "paired_bootstrap",
    "FloorDistribution",
    "floor_distribution",
    "floor_seeds",
    "FloorComparison",
    "compare_to_floor",
    "as_array",
]

#: ``scipy.stats.bootstrap`` takes its generator as ``rng`` from scipy 1.15, ``random_state`` before.
_RNG_KW = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"


def as_array(values: Any, name: str = "values", ndim: int | None = 1) -> np.ndarray:
    """``values`` (list, numpy array or torch tensor) as a finite float64 numpy array with ``ndim`` dims
    (``None``: at least one)."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if (arr.ndim != ndim) if ndim is not None else arr.ndim == 0:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds non-finite values: {arr.ravel()[~np.isfinite(arr.ravel())][:5].tolist()}")
    return arr


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}; allowed: 0 < level < 1")
    return level


def _direction(low: float, high: float) -> int:
    """+1 when the interval lies above 0, -1 below 0, 0 when it contains 0 (closed interval)."""
    return 1 if low > 0 else (-1 if high < 0 else 0)


# ------------------------------------------------------------------ paired differences over seeds
@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``d_i`` with a two-sided t-interval and p-value (see ``paired_difference``)."""

    mean: float
    sd: float
    n: int
    se: float
    df: int
    level: float
    low: float
    high: float
    t: float
    p_value: float
    degenerate: str = ""  # "", "single seed" or "zero variance"
    values: list[float] = field(default_factory=list)

    @property
    def direction(self) -> int:
        """+1 / -1 when the interval excludes 0 above / below, else 0."""
        return _direction(self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "direction": self.direction}


def paired_difference(a: Any, b: Any = None, level: float = 0.95) -> PairedDifference:
    """Paired t-analysis of ``d_i = a_i - b_i`` over seeds (``b`` omitted: ``d_i = a_i``).

    ``mean = (1/n) sum d_i``, ``sd = sqrt(sum (d_i - mean)^2 / (n - 1))``, ``se = sd / sqrt(n)``,
    ``df = n - 1``, ``t = mean / se``, interval ``mean -/+ t_{df}^{-1}((1 + level) / 2) se`` and the
    two-sided p-value ``2 (1 - T_df(|t|))`` (``scipy.stats.ttest_rel`` / ``ttest_1samp``). ``a`` and ``b``
    must be in the same seed order (pairing is by position).

    Degenerate cases (recorded in ``degenerate``):

    * ``n = 1`` ("single seed"): ``sd``, ``se``, ``t`` are NaN, the interval is ``(-inf, inf)`` and
      ``p = 1``: one seed is never evidence, and a p of 1 keeps corrections well defined.
    * ``sd = 0`` with ``n >= 2`` ("zero variance"), the limit of the t-test: a zero mean gives the
      interval ``[0, 0]`` and ``p = 1``; a nonzero mean gives ``[mean, mean]``, ``t = +-inf``, ``p = 0``.
      Exactly repeated values over seeds usually mean the seeds did not vary this computation; the flag
      lets a caller refuse such rows.
    """
    level = _check_level(level)
    a = as_array(a, "a")
    if b is None:
        d = a
    else:
        b = as_array(b, "b")
        if b.shape != a.shape:
            raise ValueError(f"a and b must have the same length (paired by seed), got {a.size} and {b.size}")
        d = a - b
    n = d.size
    mean = float(d.mean())
    values = d.tolist()
    if n == 1:
        nan = float("nan")
        return PairedDifference(mean, nan, 1, nan, 0, level, -math.inf, math.inf, nan, 1.0, "single seed", values)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    if sd == 0.0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return PairedDifference(mean, 0.0, n, 0.0, df, level, mean, mean, t, 1.0 if mean == 0 else 0.0,
                                "zero variance", values)
    t = mean / se
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    p = float(2.0 * sps.t.sf(abs(t), df))
    return PairedDifference(mean, sd, n, se, df, level, mean - half, mean + half, t, p, "", values)


# ------------------------------------------------------------------ bootstrap over evaluation samples
@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic on the full sample with its bootstrap interval (``scipy.stats.bootstrap``)."""

    estimate: float
    low: float
    high: float
    standard_error: float
    level: float
    method: str
    n_resamples: int
    n: int
    seed: int

    @property
    def direction(self) -> int:
        """+1 / -1 when the interval excludes 0 above / below, else 0."""
        return _direction(self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "direction": self.direction}


_BOOT_METHODS = ("percentile", "basic", "BCa")


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, paired: bool, level: float, n_resamples: int,
               seed: int, method: str) -> BootstrapInterval:
    level = _check_level(level)
    if method not in _BOOT_METHODS:
        raise ValueError(f"method={method!r}; allowed: {list(_BOOT_METHODS)}")
    if int(n_resamples) < 100:
        raise ValueError(f"n_resamples={n_resamples}; allowed: >= 100")
    n = data[0].size
    estimate = float(statistic(*data, axis=-1))
    if n < 2 or all(np.ptp(x) == 0 for x in data):  # nothing to resample: the statistic is fixed
        return BootstrapInterval(estimate, estimate, estimate, 0.0, level, method, int(n_resamples), n, int(seed))
    res = sps.bootstrap(data, statistic, n_resamples=int(n_resamples), vectorized=True, paired=paired,
                        confidence_level=level, method=method, **{_RNG_KW: np.random.default_rng(int(seed))})
    low, high, se = float(res.confidence_interval.low), float(res.confidence_interval.high), float(res.standard_error)
    if se == 0.0:  # every resample gives the same statistic (BCa returns NaN there): a point interval
        low = high = estimate
    return BootstrapInterval(estimate, low, high, se, level, method, int(n_resamples), n, int(seed))


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_interval(values: Any, statistic: Callable[..., Any] = _mean, level: float = 0.95,
                       n_resamples: int = 2000, seed: int = 0, method: str = "percentile") -> BootstrapInterval:
    """Bootstrap interval of ``statistic(values)`` over evaluation samples (one method).

    ``values`` (n,) holds a per-sample metric (E_i, -log p_0(x_i), a precision indicator, ...).
    ``B = n_resamples`` resamples of n indices with replacement, drawn from
    ``numpy.random.default_rng(seed)``; ``statistic(x, axis=-1)`` must be vectorised (default: the mean).
    ``method``: ``"percentile"`` (the ``(1 -/+ level) / 2`` quantiles of the B statistics), ``"basic"``
    or ``"BCa"`` (bias-corrected and accelerated; second-order accurate, with an O(n^2) jackknife).
    ``standard_error`` is the sd of the B statistics. A sample of one value, or of identical values, has
    the point interval ``[estimate, estimate]``. This is evaluation noise of one trained model only:
    seed-to-seed variation needs ``paired_difference``."""
    x = as_array(values, "values")
    return _bootstrap((x,), statistic, False, level, n_resamples, seed, method)


def paired_bootstrap(a: Any, b: Any, statistic: Callable[..., Any] = _mean, level: float = 0.95,
                     n_resamples: int = 2000, seed: int = 0, method: str = "percentile") -> BootstrapInterval:
    """Bootstrap interval of ``statistic(a) - statistic(b)`` for two methods on the same evaluation samples.

    Sample i of ``a`` and of ``b`` come from the same noise / prompt, so both are resampled with the same
    indices (``paired=True``): the interval keeps the correlation between the methods. For the mean this is
    the bootstrap of the mean per-sample difference ``mean_i (a_i - b_i)``. Other arguments as in
    ``bootstrap_interval``."""
    x, y = as_array(a, "a"), as_array(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must hold the same samples, got shapes {x.shape} and {y.shape}")

    def diff(u, v, axis=-1):
        return statistic(u, axis=axis) - statistic(v, axis=axis)

    return _bootstrap((x, y), diff, True, level, n_resamples, seed, method)


# ------------------------------------------------------------------ finite-sample floors
@dataclass(frozen=True)
class FloorDistribution:
    """A metric's value between two independent exact sample sets, over ``n`` seeded draws."""

    mean: float
    sd: float
    n: int
    values: list[float]
    seeds: list[int]

    def quantile(self, q: float) -> float:
        """Empirical quantile of the draws (linear interpolation)."""
        return float(np.quantile(self.values, q))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MIN_FLOOR_DRAWS = 10


def floor_seeds(num_draws: int, seed: int = 0) -> list[int]:
    """``num_draws`` 32-bit seeds from ``numpy.random.SeedSequence(seed)``: spread over the range, so
    draws that use ``s + 1, s + 2, ...`` internally (``toys.metrics.finite_sample_floor``) do not overlap."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(int(num_draws), dtype=np.uint32)]


def floor_distribution(draw: Callable[[int], float | Mapping[str, float]], num_draws: int = MIN_FLOOR_DRAWS,
                       seed: int = 0) -> FloorDistribution | dict[str, FloorDistribution]:
    """The floor as a distribution: ``draw(s)`` for ``num_draws >= 10`` seeds ``s = floor_seeds(num_draws, seed)``.

    ``draw(seed) -> value`` computes the metric between two independent sets of exact samples drawn from
    ``seed`` (e.g. ``lambda s: toys.metrics.finite_sample_floor(gmm, n, seed=s)``). Returns
    ``mean = (1/K) sum v_k`` and ``sd = sqrt(sum (v_k - mean)^2 / (K - 1))`` over the K draws; a draw
    returning a dict gives a dict of ``FloorDistribution`` per key (keys of the first draw)."""
    if int(num_draws) < MIN_FLOOR_DRAWS:
        raise ValueError(f"num_draws={num_draws}; allowed: >= {MIN_FLOOR_DRAWS} (a floor is a distribution)")
    seeds = floor_seeds(num_draws, seed)
    draws = [draw(s) for s in seeds]

    def summarise(vals: list[float]) -> FloorDistribution:
        v = as_array(vals, "floor draws")
        return FloorDistribution(float(v.mean()), float(v.std(ddof=1)), v.size, v.tolist(), seeds)

    if isinstance(draws[0], Mapping):
        keys = list(draws[0])
        return {k: summarise([float(d[k]) for d in draws]) for k in keys}
    return summarise([float(d) for d in draws])


@dataclass(frozen=True)
class FloorComparison:
    """``mean(values) - floor.mean`` with a Welch t-interval (unequal variances)."""

    difference: float
    low: float
    high: float
    p_value: float
    level: float

    @property
    def direction(self) -> int:
        """+1: above the floor (interval above 0); -1: below; 0: indistinguishable from the floor."""
        return _direction(self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "direction": self.direction}


def compare_to_floor(values: Any, floor: FloorDistribution, level: float = 0.95) -> FloorComparison:
    """Per-seed metric values against a floor distribution: Welch's t-interval for ``mean(v) - mean(floor)``,
    ``se = sqrt(s_v^2 / n_v + s_f^2 / n_f)`` with Welch-Satterthwaite degrees of freedom
    (``scipy.stats.ttest_ind(equal_var=False)``). Needs at least 2 values."""
    level = _check_level(level)
    v = as_array(values, "values")
    if v.size < 2:
        raise ValueError(f"need at least 2 per-seed values to compare with a floor, got {v.size}")
    res = sps.ttest_ind(v, np.asarray(floor.values), equal_var=False)
    ci = res.confidence_interval(level)
    return FloorComparison(float(v.mean() - floor.mean), float(ci.low), float(ci.high), float(res.pvalue), level)
