"""Multiple-comparison corrections: adjusted p-values (Bonferroni, Holm, Benjamini-Hochberg) and the interval
levels that match each correction's decisions."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CORRECTIONS", "bonferroni", "holm", "benjamini_hochberg", "adjust_p_values", "adjusted_levels"]

#: accepted ``method`` names
CORRECTIONS = ("holm", "bonferroni", "bh", "none")


def _p_array(p_values: Any) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-dimensional, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must lie in [0, 1], got {p.tolist()}")
    return p


def _check(method: str, alpha: float) -> None:
    if method not in CORRECTIONS:
        raise ValueError(f"method={method!r}; allowed: {list(CORRECTIONS)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}; allowed: 0 < alpha < 1")


def bonferroni(p_values: Any) -> np.ndarray:
    """``p~_i = min(1, m p_i)``."""
    p = _p_array(p_values)
    return np.minimum(1.0, p.size * p)


def holm(p_values: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values (controls the family-wise error rate).

    With ``p_(1) <= ... <= p_(m)`` sorted ascending: ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    Rejecting ``p~_i <= alpha`` is Holm's procedure (reject ``p_(1..k)`` while ``p_(k) <= alpha / (m - k + 1)``).
    """
    p = _p_array(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.maximum.accumulate(scaled)
    return out


def benjamini_hochberg(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (controls the false discovery rate under independence or PRDS).

    ``p~_(i) = min_{j >= i} min(1, m p_(j) / j)``; rejecting ``p~_i <= alpha`` rejects ``p_(1..R)`` with
    ``R = max{k: p_(k) <= k alpha / m}``. Same values as ``scipy.stats.false_discovery_control(p, method='bh')``.
    """
    p = _p_array(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    out = np.empty(m)
    out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out


def adjust_p_values(p_values: Any, method: str = "holm") -> np.ndarray:
    """Adjusted p-values by ``method`` in ``CORRECTIONS`` (``"none"`` returns them unchanged)."""
    _check(method, 0.05)
    p = _p_array(p_values)
    return {"holm": holm, "bonferroni": bonferroni, "bh": benjamini_hochberg}.get(method, lambda q: q.copy())(p)


def adjusted_levels(p_values: Any, alpha: float = 0.05, method: str = "holm") -> np.ndarray:
    """Per-hypothesis confidence levels ``1 - alpha_i`` whose intervals agree with the correction's decisions.

    A two-sided t-interval at level ``1 - a`` excludes 0 exactly when the two-sided p-value is ``< a``, so
    each hypothesis gets the ``a`` it is actually tested at:

    * ``"none"``: ``a = alpha``.
    * ``"bonferroni"``: ``a = alpha / m`` for all (simultaneous intervals: all m cover jointly with
      probability >= 1 - alpha).
    * ``"holm"``: the step-down level. Sorted ascending, hypothesis of rank k (1-based) is tested at
      ``alpha / (m - k + 1)`` while every smaller rank was rejected; from the first non-rejected rank k*
      on, every hypothesis gets ``alpha / (m - k* + 1)``. An interval excludes 0 iff Holm rejects (ties
      ``p = a`` aside). These are not simultaneous intervals (Holm has no informative simultaneous
      intervals); for simultaneous coverage use ``"bonferroni"``, which is Holm's first step for all.
    * ``"bh"``: the false-coverage-rate level of Benjamini & Yekutieli (2005), ``a = R alpha / m`` with
      R the number of BH rejections (``a = alpha / m`` when R = 0); an interval excludes 0 iff BH rejects.
    """
    _check(method, alpha)
    p = _p_array(p_values)
    m = p.size
    if m == 0:
        return np.empty(0)
    if method == "none":
        a = np.full(m, alpha)
    elif method == "bonferroni":
        a = np.full(m, alpha / m)
    elif method == "bh":
        order = np.sort(p)
        passed = np.nonzero(order <= alpha * np.arange(1, m + 1) / m)[0]
        r = int(passed[-1]) + 1 if passed.size else 0
        a = np.full(m, max(r, 1) * alpha / m)
    else:  # holm
        order = np.argsort(p, kind="stable")
        a = np.empty(m)
        stopped_at = None
        for rank, i in enumerate(order):  # rank 0-based: tested at alpha / (m - rank)
            if stopped_at is None and not p[i] < alpha / (m - rank):
                stopped_at = rank
            a[i] = alpha / (m - (rank if stopped_at is None else stopped_at))
    return 1.0 - a
