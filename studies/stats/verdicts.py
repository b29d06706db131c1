"""Regime verdicts: is a regime a CD / Direct CD "paradox", with paired intervals over seeds corrected across
every regime counted?"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .intervals import PairedDifference, as_array, paired_difference
from .multiple import CORRECTIONS, adjust_p_values, adjusted_levels

__all__ = ["VERDICTS", "RegimeInput", "RegimeVerdict", "VerdictSet", "classify_regimes", "verdict_from_directions"]

#: every verdict ``classify_regimes`` can return
VERDICTS = ("paradox", "CD better", "Direct CD better", "mixed", "tie")

E_DIRECTION = {1: "Direct CD lower E", -1: "CD lower E", 0: "tie"}
Q_DIRECTION = {1: "CD better samples", -1: "Direct CD better samples", 0: "tie"}


@dataclass
class RegimeInput:
    """Per-seed paired differences of one regime (same seeds, same order, for both methods).

    ``dE[i] = E_cd[i] - E_dcd[i]`` (> 0: Direct CD solves the teacher's ODE better) and
    ``dQ[i] = Q_dcd[i] - Q_cd[i]`` for a lower-is-better quality metric (> 0: CD has the better samples).
    ``quick``: the numbers come from a smoke run (excluded from verdicts unless asked)."""

    label: str
    dE: Sequence[float]
    dQ: Sequence[float]
    quality_key: str = ""
    quick: bool = False
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dE = as_array(self.dE, f"dE of regime {self.label!r}").tolist()
        self.dQ = as_array(self.dQ, f"dQ of regime {self.label!r}").tolist()

    @classmethod
    def from_methods(cls, label: str, E_cd: Sequence[float], E_dcd: Sequence[float], Q_cd: Sequence[float],
                     Q_dcd: Sequence[float], higher_is_better: bool = False, **kw: Any) -> "RegimeInput":
        """From per-seed values of each method: ``dE = E_cd - E_dcd``; ``dQ = Q_dcd - Q_cd`` for a
        lower-is-better metric, ``dQ = Q_cd - Q_dcd`` when ``higher_is_better`` (so > 0 always means CD
        has the better samples)."""
        for name, a, b in (("E", E_cd, E_dcd), ("quality", Q_cd, Q_dcd)):
            if len(a) != len(b):
                raise ValueError(f"regime {label!r}: {name} has {len(a)} CD seeds and {len(b)} Direct CD seeds; "
                                 "paired differences need the same seeds for both methods")
        e_cd, e_dcd = as_array(E_cd, "E_cd"), as_array(E_dcd, "E_dcd")
        q_cd, q_dcd = as_array(Q_cd, "Q_cd"), as_array(Q_dcd, "Q_dcd")
        dq = q_cd - q_dcd if higher_is_better else q_dcd - q_cd
        return cls(label, (e_cd - e_dcd).tolist(), dq.tolist(), **kw)


@dataclass
class RegimeVerdict:
    """The verdict of one regime: intervals at the regime's corrected ``level`` and the IUT p-values."""

    label: str
    verdict: str
    level: float
    dE: PairedDifference
    dQ: PairedDifference
    e_direction: str
    q_direction: str
    p_paradox: float
    p_paradox_adjusted: float
    quality_key: str = ""
    quick: bool = False
    params: dict = field(default_factory=dict)

    @property
    def paradox(self) -> bool:
        return self.verdict == "paradox"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "verdict": self.verdict, "level": self.level, "dE": self.dE.to_dict(),
                "dQ": self.dQ.to_dict(), "e_direction": self.e_direction, "q_direction": self.q_direction,
                "p_paradox": self.p_paradox, "p_paradox_adjusted": self.p_paradox_adjusted,
                "quality_key": self.quality_key, "quick": self.quick, "params": dict(self.params)}


@dataclass
class VerdictSet:
    """Verdicts of all regimes counted, with the correction that was applied across them."""

    regimes: list[RegimeVerdict]
    method: str
    alpha: float
    num_comparisons: int
    excluded_quick: list[str] = field(default_factory=list)

    @property
    def paradoxes(self) -> list[RegimeVerdict]:
        return [r for r in self.regimes if r.paradox]

    def by_label(self) -> dict[str, RegimeVerdict]:
        return {r.label: r for r in self.regimes}

    def to_dict(self) -> dict[str, Any]:
        return {"correction": {"method": self.method, "alpha": self.alpha, "num_comparisons": self.num_comparisons},
                "excluded_quick": list(self.excluded_quick),
                "regimes": [r.to_dict() for r in self.regimes]}


def verdict_from_directions(e: int, q: int) -> str:
    """The verdict from the interval directions ``e`` of dE and ``q`` of dQ (each +1, -1 or 0).

    * ``paradox``: ``e = +1`` and ``q = +1`` (Direct CD lower E, CD better samples).
    * ``tie``: ``e = 0`` and ``q = 0``.
    * ``Direct CD better``: better on at least one, worse on neither (``e = +1`` or ``q = -1``; ``e != -1``,
      ``q != +1``): Pareto dominance for Direct CD.
    * ``CD better``: likewise for CD (``e = -1`` or ``q = +1``; ``e != +1``, ``q != -1``).
    * ``mixed``: ``e = -1`` and ``q = -1`` (CD lower E, Direct CD better samples: the reverse trade-off).
    """
    if e == 1 and q == 1:
        return "paradox"
    if e == -1 and q == -1:
        return "mixed"
    if e == 0 and q == 0:
        return "tie"
    return "Direct CD better" if (e == 1 or q == -1) else "CD better"


def classify_regimes(regimes: Sequence[RegimeInput], alpha: float = 0.05, method: str = "holm",
                     include_quick: bool = False) -> VerdictSet:
    """Verdicts for a list of regimes, corrected for the number of regimes counted (``num_comparisons``).

    Per regime, paired t-analyses over seeds of ``dE`` and ``dQ`` (``paired_difference``). The paradox claim
    needs both effects in the paradox direction (an intersection-union test), so its p-value is
    ``p_r = max(p_E, p_Q)`` when ``mean dE > 0`` and ``mean dQ > 0``, else 1 (the claim is already
    excluded). The ``p_r`` of the m regimes counted are corrected by ``method`` (``"holm"`` controls the
    family-wise error of the paradox claims, ``"bonferroni"`` too with simultaneous intervals, ``"bh"``
    the false discovery rate, ``"none"`` nothing) and each regime's intervals are reported at the matching
    level (``adjusted_levels``: ``1 - alpha / m`` for Bonferroni, Holm's step-down level, BH's
    false-coverage level). A regime is a ``paradox`` only when both intervals at that level exclude 0 on
    the positive side, which is exactly when the corrected test rejects (ties ``p = level`` aside); the
    other verdicts (``verdict_from_directions``) read the same intervals and are descriptive: only the
    paradox claim is error-controlled across regimes. A regime with one seed has p = 1 and verdict tie.

    Regimes marked ``quick`` are left out (their labels are listed in ``excluded_quick``) unless
    ``include_quick``; included, they count in m and keep ``quick = True`` in their verdicts."""
    if method not in CORRECTIONS:
        raise ValueError(f"method={method!r}; allowed: {list(CORRECTIONS)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}; allowed: 0 < alpha < 1")
    counted = [r for r in regimes if include_quick or not r.quick]
    excluded = [r.label for r in regimes if r.quick and not include_quick]
    m = len(counted)
    if m == 0:
        return VerdictSet([], method, float(alpha), 0, excluded)
    raw = [(paired_difference(r.dE), paired_difference(r.dQ)) for r in counted]
    p_iut = np.array([max(e.p_value, q.p_value) if (e.mean > 0 and q.mean > 0) else 1.0 for e, q in raw])
    levels = adjusted_levels(p_iut, alpha, method)
    p_adj = adjust_p_values(p_iut, method)
    out = []
    for r, level, p, pa in zip(counted, levels, p_iut, p_adj):
        de, dq = paired_difference(r.dE, level=level), paired_difference(r.dQ, level=level)
        out.append(RegimeVerdict(
            label=r.label, verdict=verdict_from_directions(de.direction, dq.direction), level=float(level),
            dE=de, dQ=dq, e_direction=E_DIRECTION[de.direction], q_direction=Q_DIRECTION[dq.direction],
            p_paradox=float(p), p_paradox_adjusted=float(pa), quality_key=r.quality_key, quick=r.quick,
            params=dict(r.params)))
    return VerdictSet(out, method, float(alpha), m, excluded)
