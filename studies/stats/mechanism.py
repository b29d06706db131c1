"""Mechanism decomposition (issue 13 item 7): does the student's misfit to the teacher's ODE point toward the
true ODE endpoint?"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .intervals import BootstrapInterval, _bootstrap, as_array

__all__ = ["ErrorDecomposition", "error_decomposition"]


@dataclass(frozen=True)
class ErrorDecomposition:
    """Per-sample split ``student - true = (teacher - true) + (student - teacher) = a_i + b_i`` (see
    ``error_decomposition``); mean squared norms are per sample (summed over coordinates)."""

    n: int
    teacher_error_sq: float  # mean_i |a_i|^2
    student_error_sq: float  # mean_i |b_i|^2
    cross: float  # 2 mean_i <a_i, b_i>
    total_error_sq: float  # mean_i |a_i + b_i|^2 = teacher_error_sq + student_error_sq + cross
    correlation: BootstrapInterval  # rho = mean<a, b> / sqrt(mean|a|^2 mean|b|^2)
    mean_cosine: BootstrapInterval  # mean_i cos(a_i, b_i)
    correction: BootstrapInterval  # beta = -mean<a, b> / mean|a|^2

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("correlation", "mean_cosine", "correction"):
            out[key] = getattr(self, key).to_dict()
        return out


def _rows(x: Any, name: str) -> np.ndarray:
    """(n, ...) -> (n, D) float64; a 1-D input is n scalar samples."""
    arr = as_array(x, name, ndim=None)
    return arr.reshape(arr.shape[0], -1)


def _corr(ab, aa, bb, axis=-1):
    return np.mean(ab, axis=axis) / np.sqrt(np.mean(aa, axis=axis) * np.mean(bb, axis=axis))


def _correction(ab, aa, axis=-1):
    return -np.mean(ab, axis=axis) / np.mean(aa, axis=axis)


def _mean(c, axis=-1):
    return np.mean(c, axis=axis)


def error_decomposition(student: Any, teacher: Any, true: Any, level: float = 0.95, n_resamples: int = 2000,
                        seed: int = 0, method: str = "percentile") -> ErrorDecomposition:
    """Split the student's error against the true ODE endpoint, sample by sample.

    ``student``, ``teacher`` and ``true`` are (n, ...) endpoints from the same n noises: the one-step student
    ``f_theta(x_T, T)``, the teacher's solver ``f_solver(x_T, T, 0)`` and the exact PF-ODE of ``p_0``
    (trailing dimensions are flattened). With ``a_i = teacher_i - true_i`` (the teacher's error) and
    ``b_i = student_i - teacher_i`` (the student's own error):

    * ``mean|a + b|^2 = mean|a|^2 + mean|b|^2 + 2 mean<a, b>`` (``total = teacher + student + cross``);
    * ``correlation rho = mean<a, b> / sqrt(mean|a|^2 mean|b|^2)`` (the uncentred correlation of the two
      error vectors over samples and coordinates; errors have a natural zero): ``rho < 0`` means the
      student's misfit points back toward the truth, ``rho = -1`` when ``b_i = -c a_i``;
    * ``mean_cosine = mean_i <a_i, b_i> / (|a_i| |b_i|)`` (samples where either norm is 0 count as 0);
    * ``correction beta = -mean<a, b> / mean|a|^2``: the least-squares coefficient of ``b`` on ``-a``, the
      fraction of the teacher's error the student undoes (1: the student lands on the truth on average
      along ``a``).

    The three ratios come with bootstrap intervals over samples (``paired`` resampling of the per-sample
    terms; ``n_resamples``, ``seed`` and ``method`` as in ``bootstrap_interval``)."""
    s, t, x = _rows(student, "student"), _rows(teacher, "teacher"), _rows(true, "true")
    if not s.shape == t.shape == x.shape:
        raise ValueError(f"student, teacher and true must have the same shape, got {s.shape}, {t.shape}, {x.shape}")
    a, b = t - x, s - t
    ab, aa, bb = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)
    if aa.mean() == 0 or bb.mean() == 0:
        raise ValueError("the teacher's or the student's error is zero on every sample: no decomposition")
    norms = np.sqrt(aa * bb)
    cos = np.divide(ab, norms, out=np.zeros_like(ab), where=norms > 0)
    kw = dict(level=level, n_resamples=n_resamples, seed=seed, method=method)
    return ErrorDecomposition(
        n=int(a.shape[0]), teacher_error_sq=float(aa.mean()), student_error_sq=float(bb.mean()),
        cross=float(2 * ab.mean()), total_error_sq=float(((a + b) ** 2).sum(1).mean()),
        correlation=_bootstrap((ab, aa, bb), _corr, True, **kw),
        mean_cosine=_bootstrap((cos,), _mean, False, **kw),
        correction=_bootstrap((ab, aa), _correction, True, **kw))
