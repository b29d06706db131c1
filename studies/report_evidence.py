"""The evidence per explanation in ``studies.report``, derived only from the corrected verdicts
(``report_verdicts``): within one study, the regimes where a factor is on are contrasted with the study's regimes
where it is off (score approximation: a wrong teacher score vs the exact score; latent space: a non-identity
decoder vs the identity decoder; inductive bias: regimes where only the objective differs)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .report_comparisons import Comparison, StudyVerdicts, converged_text, verdict_counts
from .report_io import QUICK_LABEL

__all__ = [
    "Evidence",
    "EXPLANATIONS",
    "evidence_score_approximation",
    "evidence_latent_space",
    "evidence_inductive_bias",
    "spearman",
]


@dataclass
class Evidence:
    """Lines for and against one explanation, and what the numbers leave open; each line carries its intervals,
    correction, budget and convergence."""

    title: str
    supports: list[str] = field(default_factory=list)
    against: list[str] = field(default_factory=list)
    open: list[str] = field(default_factory=list)


SCORE_KEYS, SCORE_OFF = ("score_error", "score"), {"exact", "true", "none", "off"}
#: a numeric switch at most this large is off (an exact teacher's measured score error is float rounding)
SWITCH_ZERO_TOL = 1e-10
DECODER_KEYS, DECODER_OFF = ("decoder", "space"), {"identity", "pixel", "none", "off"}


def _switch(c: Comparison, keys: Sequence[str], off: set[str]) -> bool | None:
    """True when the factor is on in this regime, False when off (a value in ``off``, False, or a number within
    ``SWITCH_ZERO_TOL`` of 0), None when the regime does not record it."""
    for source in (c.switches, c.params):
        for k in keys:
            if k in source and source[k] is not None:
                v = source[k]
                if isinstance(v, bool):
                    return v
                if isinstance(v, (int, float)):
                    return abs(float(v)) > SWITCH_ZERO_TOL
                return str(v).lower() not in off
    return None


def _describe(c: Comparison, sv: StudyVerdicts) -> str:
    tag = f"[{QUICK_LABEL}] " if c.quick else ""
    return (f"{tag}{c.label} ({c.verdict()}): {c.intervals()}, {sv.correction_text()}; {sv.budget}; "
            f"converged: {converged_text(c.converged)}")


def _contrast(sv: StudyVerdicts, on_text: str, off_text: str, state: Callable[[Comparison], bool | None],
              ev: Evidence) -> None:
    """The paradox should hold with the factor on and not in the study's control regimes (factor off)."""
    on = [c for c in sv.comparisons if state(c) is True]
    off = [c for c in sv.comparisons if state(c) is False]
    p_on, p_off = [c for c in on if c.paradox], [c for c in off if c.paradox]
    desc = lambda cs: "; ".join(_describe(c, sv) for c in cs)  # noqa: E731
    if p_off:
        ev.against.append(f"{sv.study}: the paradox holds with {off_text}, so {on_text} is not needed for it there — "
                          f"{desc(p_off)}" + (f"; it holds with {on_text} too — {desc(p_on)}" if p_on else ""))
    elif p_on and off:
        ev.supports.append(f"{sv.study}: the paradox holds with {on_text} — {desc(p_on)} — and in none of the "
                           f"{len(off)} control regime(s) with {off_text} ({verdict_counts(off)})")
    elif p_on:
        ev.open.append(f"{sv.study}: the paradox holds with {on_text} — {desc(p_on)} — but the study has no regime "
                       f"with {off_text}, so it cannot be attributed to {on_text}")
    if on and not p_on:
        ev.open.append(f"{sv.study}: none of the {len(on)} regime(s) with {on_text} reaches a paradox verdict "
                       f"({verdict_counts(on)}; {sv.correction_text()}; {sv.budget}): a non-detection at this budget "
                       f"and seed count, not evidence of absence")


def _score_state(c: Comparison) -> bool | None:
    return _switch(c, SCORE_KEYS, SCORE_OFF)


def _decoder_state(c: Comparison) -> bool | None:
    return _switch(c, DECODER_KEYS, DECODER_OFF)


def evidence_score_approximation(verdicts: dict[str, StudyVerdicts]) -> Evidence:
    """For: within a study, the paradox holds once the teacher's score is wrong and in none of its exact-score
    regimes. Against: it holds with the exact score. Open: a paradox without an exact-score control, or none."""
    ev = Evidence("Score approximation")
    for sv in verdicts.values():
        _contrast(sv, "a wrong teacher score", "the exact score", _score_state, ev)
    return ev


def evidence_latent_space(verdicts: dict[str, StudyVerdicts]) -> Evidence:
    """For: within a study, the paradox holds after a non-identity decoder and in none of its identity-decoder
    regimes. Against: it holds with the identity decoder. Open: otherwise."""
    ev = Evidence("Latent space")
    for sv in verdicts.values():
        _contrast(sv, "a non-identity decoder", "the identity decoder", _decoder_state, ev)
    return ev


def evidence_inductive_bias(verdicts: dict[str, StudyVerdicts]) -> Evidence:
    """With the exact score and the identity decoder only the objective differs. For: a paradox there. Against:
    Direct CD has the better samples there (its dQ interval below 0). Open: only ties / E-only differences."""
    ev = Evidence("Inductive bias")
    for sv in verdicts.values():
        pure = [c for c in sv.comparisons if _score_state(c) is False and _decoder_state(c) is False]
        if not pure:
            continue
        para = [c for c in pure if c.paradox]
        worse = [c for c in pure if c.result.dQ.direction < 0]
        if para:
            ev.supports.append(f"{sv.study}: with the exact score and the identity decoder (only the objective "
                               f"differs) the paradox holds — " + "; ".join(_describe(c, sv) for c in para))
        if worse:
            ev.against.append(f"{sv.study}: with only the objective differing, Direct CD has the better samples — "
                              + "; ".join(_describe(c, sv) for c in worse))
        if not para:
            ev.open.append(f"{sv.study}: none of the {len(pure)} regime(s) with only the objective differing reaches a "
                           f"paradox verdict ({verdict_counts(pure)}; {sv.correction_text()}; {sv.budget}): a "
                           f"non-detection at this budget and seed count, not evidence of absence")
    return ev


EXPLANATIONS = [
    ("Score approximation", evidence_score_approximation),
    ("Latent space", evidence_latent_space),
    ("Inductive bias", evidence_inductive_bias),
]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties); NaN for fewer than 3
    points or a constant input."""
    if len(x) < 3 or len(x) != len(y):
        return float("nan")
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = spearmanr(list(x), list(y)).statistic
    return float(r)
