"""The records ``studies.report`` writes findings from: ``Comparison`` (CD vs Direct CD in one regime) and
``StudyVerdicts`` (one study's corrected family), with their interval, convergence and count texts.

Computed by ``studies.report_verdicts`` (signs of ``dE`` / ``dQ`` as in its module docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .common import fmt
from .report_io import METHOD_LABEL, METHODS
from .stats import VERDICTS, PairedDifference, RegimeVerdict

__all__ = [
    "Comparison",
    "StudyVerdicts",
    "verdict_counts",
    "interval_text",
    "converged_text",
    "CORRECTION_NAMES",
]

#: how the report names each ``studies.stats.CORRECTIONS`` method
CORRECTION_NAMES = {"holm": "Holm", "bonferroni": "Bonferroni", "bh": "Benjamini-Hochberg", "none": "no correction"}


# --------------------------------------------------------------------------------------------------------------
# formatting of intervals and convergence
# --------------------------------------------------------------------------------------------------------------
def _bound(x: float | None, neg: bool) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return "-inf" if neg else "inf"
    return fmt(x)


def interval_text(d: PairedDifference) -> str:
    """``mean [low, high]``; ``mean (one seed: no interval)`` for a single seed."""
    if d.degenerate == "single seed":
        return f"{fmt(d.mean)} (one seed: no interval)"
    return f"{fmt(d.mean)} [{_bound(d.low, True)}, {_bound(d.high, False)}]"


def converged_text(converged: Any) -> str:
    """Convergence from a regime's ``converged`` block: per method a bool, a list of bools per seed, or
    ``{"converged": ...}``. ``"CD yes, Direct CD 1/2 seeds"``; ``"not recorded"`` when absent."""
    def text(v: Any) -> str | None:
        if isinstance(v, dict):
            v = v.get("converged")
        if isinstance(v, (list, tuple)):
            flags = [bool(x) for x in v if x is not None]
            if not flags:
                return None
            k = sum(flags)
            return "yes" if k == len(flags) else ("no" if k == 0 else f"{k}/{len(flags)} seeds")
        return None if v is None else ("yes" if bool(v) else "no")

    if isinstance(converged, (bool, list)):
        return text(converged) or "not recorded"
    if isinstance(converged, dict):
        parts = [f"{METHOD_LABEL[m]} {text(converged[m])}" for m in METHODS if m in converged and text(converged[m])]
        if parts:
            return ", ".join(parts)
    return "not recorded"


# --------------------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """CD vs Direct CD in one regime with its corrected verdict (``result``) and the methods' statistics.

    ``label`` names the regime with every member merged into it (``"ddim N=10 = euler N=10"``); ``key`` is the
    kept regime's own label. ``dE`` / ``dQ`` are the mean paired differences (signs as in ``studies.report_verdicts``)."""

    label: str
    key: str
    result: RegimeVerdict
    E_cd: dict
    E_dcd: dict
    Q_cd: dict
    Q_dcd: dict
    quality_key: str
    params: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)
    group: str = ""
    converged: Any = None
    quick: bool = False
    e_key: str = "E"

    @property
    def dE(self) -> float:
        return self.result.dE.mean

    @property
    def dQ(self) -> float:
        return self.result.dQ.mean

    @property
    def se_E(self) -> float:
        return self.result.dE.se

    @property
    def se_Q(self) -> float:
        return self.result.dQ.se

    @property
    def seeds(self) -> int:
        return self.result.dE.n

    @property
    def level(self) -> float:
        return self.result.level

    @property
    def paradox(self) -> bool:
        return self.result.verdict == "paradox"

    def verdict(self) -> str:
        """The corrected verdict (one of ``studies.stats.VERDICTS``)."""
        return self.result.verdict

    def intervals(self) -> str:
        """``dE = .. [..], d<Q> = .. [..] (level)``."""
        return (f"d{self.e_key} = {interval_text(self.result.dE)}, "
                f"d{self.quality_key} = {interval_text(self.result.dQ)} "
                f"({100 * self.level:.4g}% intervals, {self.seeds} seed{'s' if self.seeds != 1 else ''})")

    def sentence(self) -> str:
        return f"{self.label}: {self.verdict()}; {self.intervals()}"


@dataclass
class StudyVerdicts:
    """The verdicts of one study's regimes and how they were obtained.

    ``source``: ``"study"`` (the study's own ``verdicts`` block) or ``"recomputed"`` (``classify_regimes`` here);
    ``note`` says why a study's block was not used. ``uncompared``: regimes left out, with the reason."""

    study: str
    quality_key: str
    quality_label: str
    e_key: str
    comparisons: list[Comparison]
    correction: str
    alpha: float
    num_comparisons: int
    source: str
    note: str = ""
    merged: list[dict] = field(default_factory=list)
    uncompared: list[str] = field(default_factory=list)
    quick: bool = False
    budget: str = "training budget not recorded"

    @property
    def paradoxes(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.paradox]

    def correction_text(self) -> str:
        m = self.num_comparisons
        name = CORRECTION_NAMES.get(self.correction, self.correction)
        return f"{name} over {m} regime{'s' if m != 1 else ''} (family error {self.alpha:g})"

    def counts_text(self) -> str:
        return verdict_counts(self.comparisons)

    def count_sentence(self) -> str:
        """``"p/m regimes show the paradox"`` and the intervals of each paradox regime."""
        p = self.paradoxes
        head = f"{len(p)}/{len(self.comparisons)} regimes show the paradox"
        if p:
            head += " (" + "; ".join(f"{c.label}: {c.intervals()}" for c in p) + ")"
        return head


def verdict_counts(comps: Iterable[Comparison]) -> str:
    counts: dict[str, int] = {}
    for c in comps:
        counts[c.verdict()] = counts.get(c.verdict(), 0) + 1
    return ", ".join(f"{n} {v}" for v in VERDICTS for n in [counts.get(v, 0)] if n) or "no regimes"
