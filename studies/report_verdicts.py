"""Verdicts for ``studies.report``: CD vs Direct CD per regime with corrected paired intervals over seeds
(``studies.stats.classify_regimes``), from a study's own ``verdicts`` block when it is consistent, else recomputed.

Per regime, over seeds paired by position (or by ``seeds`` when recorded):
``dE_i = E_CD,i - E_DirectCD,i`` (> 0: Direct CD solves the teacher's ODE more accurately) and
``dQ_i = Q_DirectCD,i - Q_CD,i`` for a lower-is-better distance (> 0: CD has the better samples; the sign is
flipped for higher-is-better metrics). ``classify_regimes`` gives each regime paired t-intervals at the level its
correction assigns (Holm by default, over the m regimes of one study) and a verdict: ``paradox`` only when both
intervals lie above 0. Identical regimes are merged first (``report_io.merge_regimes``), so none counts twice.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

from toys.metrics import HIGHER_IS_BETTER as TOY_HIGHER_IS_BETTER

from .report_comparisons import (
    CORRECTION_NAMES,
    Comparison,
    StudyVerdicts,
    converged_text,
    interval_text,
    verdict_counts,
)
from .report_io import METHOD_LABEL, METHODS, QUICK_LABEL, StudyResult, display_name, merge_regimes
from .stats import (
    VERDICTS,
    PairedDifference,
    RegimeInput,
    RegimeVerdict,
    VerdictSet,
    classify_regimes,
    verdict_from_directions,
)

__all__ = [
    "Comparison",
    "StudyVerdicts",
    "study_verdicts",
    "secondary_verdicts",
    "regime_verdicts",
    "compare_methods",
    "verdicts_from_dict",
    "verdict_counts",
    "interval_text",
    "converged_text",
    "HIGHER_IS_BETTER",
    "CORRECTION_NAMES",
]

#: lower-is-better unless listed here (or in a study's ``higher_is_better``); suffixes ``_p0`` / ``_teacher`` ignored
HIGHER_IS_BETTER = set(TOY_HIGHER_IS_BETTER) | {"clip", "clip_score", "aesthetic"}
#: ODE errors against the exact PF-ODE (a second question beside E against the teacher's solver)
EXACT_E_KEYS = ("E_exact", "E_true_ode")
#: secondary quality keys tried when a study names none (the distance-to-data metrics: the second question)
DEFAULT_ALT_KEYS = ("w2_p0", "mmd2_p0", "w2", "sliced_w2", "mmd2", "mode_tv")


# --------------------------------------------------------------------------------------------------------------
# recomputed comparisons
# --------------------------------------------------------------------------------------------------------------
def _budget_text(budget: dict, source: str) -> str:
    if not budget:
        return "training budget not recorded"
    body = ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None and v != "")
    return f"training budget {body}" + (f" (from {source})" if source and source != "metrics.json" else "")


def _higher(key: str, extra: Iterable[str] = ()) -> bool:
    base = key
    for suffix in ("_p0", "_teacher", "_data"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return key in set(extra) or base in HIGHER_IS_BETTER | set(extra)


def _pair(a: dict, b: dict) -> tuple[list[float], list[float]] | str:
    """Per-seed values of two methods, paired by ``seeds`` when both record them, else by position."""
    va, vb = a.get("values"), b.get("values")
    if not va or not vb:
        return "no per-seed values"
    sa, sb = a.get("seeds"), b.get("seeds")
    if sa and sb and len(sa) == len(va) and len(sb) == len(vb):
        ib = dict(zip(sb, vb))
        shared = [s for s in sa if s in ib]
        if len(shared) != len(sa) or len(shared) != len(sb):
            return f"CD seeds {sa} and Direct CD seeds {sb} differ"
        va, vb = [dict(zip(sa, va))[s] for s in shared], [ib[s] for s in shared]
    elif len(va) != len(vb):
        return f"{len(va)} CD seeds vs {len(vb)} Direct CD seeds: cannot pair"
    for name, v in (("CD", va), ("Direct CD", vb)):
        bad = [i for i, x in enumerate(v) if not isinstance(x, (int, float)) or not math.isfinite(x)]
        if bad:
            return f"{name} has non-finite values at seed positions {bad}"
    return [float(x) for x in va], [float(x) for x in vb]


def _regime_input(r: dict, q: str, e_key: str, higher: Iterable[str], quick: bool) -> RegimeInput | str:
    m = r.get("methods", {})
    missing = [f"{METHOD_LABEL[k]} {key}" for k in METHODS for key in (e_key, q) if key not in m.get(k, {})]
    if missing:
        return "missing " + ", ".join(missing)
    pe, pq = _pair(m["cd"][e_key], m["direct_cd"][e_key]), _pair(m["cd"][q], m["direct_cd"][q])
    for what, p in ((e_key, pe), (q, pq)):
        if isinstance(p, str):
            return f"{what}: {p}"
    return RegimeInput.from_methods(r["label"], pe[0], pe[1], pq[0], pq[1], higher_is_better=_higher(q, higher),
                                    quality_key=q, quick=quick or bool(r.get("quick")),
                                    params=dict(r.get("params", {})))


def _comparison(r: dict | None, v: RegimeVerdict, q: str, e_key: str, quick: bool) -> Comparison:
    r = r or {"label": v.label}
    m = r.get("methods", {})
    get = lambda meth, k: m.get(meth, {}).get(k, {})  # noqa: E731
    return Comparison(label=display_name(r), key=v.label, result=v, E_cd=get("cd", e_key),
                      E_dcd=get("direct_cd", e_key),
                      Q_cd=get("cd", q), Q_dcd=get("direct_cd", q), quality_key=q, params=dict(r.get("params", {})),
                      switches=dict(r.get("switches", {})), group=str(r.get("group", "")),
                      converged=r.get("converged"), quick=quick or v.quick, e_key=e_key)


def _counted(regimes: list[dict]) -> tuple[list[dict], list[str]]:
    """The regimes a correction counts, and a note on those it does not: a regime marked ``"reference": true``
    (paradox_map's k = 1 cells: CD compared with itself, difference 0 by construction) is never a comparison."""
    reference = [r for r in regimes if r.get("reference")]
    note = ([f"reference cells (CD compared with itself by construction), not counted: "
             f"{', '.join(display_name(r) for r in reference)}"] if reference else [])
    return [r for r in regimes if not r.get("reference")], note


def _recompute(regs: list[dict], q: str, e_key: str, higher: Iterable[str], quick: bool, include_quick: bool,
               alpha: float, method: str) -> tuple[VerdictSet, list[Comparison], list[str]]:
    inputs, uncompared, by_label = [], [], {}
    for i, r in enumerate(regs):
        r.setdefault("label", f"regime {i}")
        if r["label"] in by_label:  # labels name regimes in the verdicts: keep them unique
            r["label"] = f"{r['label']} #{i}"
        by_label[r["label"]] = r
        ri = _regime_input(r, q, e_key, higher, quick)
        if isinstance(ri, str):
            uncompared.append(f"{display_name(r)}: {ri}")
        else:
            inputs.append(ri)
    vs = classify_regimes(inputs, alpha=alpha, method=method, include_quick=include_quick)
    comps = [_comparison(by_label.get(v.label), v, q, e_key, quick) for v in vs.regimes]
    uncompared += [f"{lab}: {QUICK_LABEL}, left out" for lab in vs.excluded_quick]
    return vs, comps, uncompared


# --------------------------------------------------------------------------------------------------------------
# a study's own verdicts block
# --------------------------------------------------------------------------------------------------------------
def _num(x: Any, default: float = math.nan) -> float:
    return default if x is None else float(x)


def _paired_from_dict(d: dict) -> PairedDifference:
    return PairedDifference(mean=_num(d["mean"]), sd=_num(d.get("sd")), n=int(d.get("n", 0)), se=_num(d.get("se")),
                            df=int(d.get("df") or 0), level=_num(d.get("level")), low=_num(d.get("low"), -math.inf),
                            high=_num(d.get("high"), math.inf), t=_num(d.get("t")), p_value=_num(d.get("p_value"), 1.0),
                            degenerate=str(d.get("degenerate") or ""), values=list(d.get("values") or []))


def verdicts_from_dict(d: dict) -> VerdictSet:
    """``VerdictSet.to_dict()`` read back (``write_json`` stores infinite bounds as null: read as -inf / inf).

    Raises ``ValueError`` when a verdict is not one of ``VERDICTS`` or does not follow from its own intervals."""
    corr = d.get("correction") or {}
    regimes = []
    for r in d.get("regimes", []):
        de, dq = _paired_from_dict(r["dE"]), _paired_from_dict(r["dQ"])
        if r.get("verdict") not in VERDICTS:
            raise ValueError(f"regime {r.get('label')!r}: verdict {r.get('verdict')!r} is not one of {list(VERDICTS)}")
        implied = verdict_from_directions(de.direction, dq.direction)
        if implied != r["verdict"]:
            raise ValueError(f"regime {r.get('label')!r}: verdict {r['verdict']!r} but its intervals give {implied!r}")
        regimes.append(RegimeVerdict(
            label=str(r["label"]), verdict=r["verdict"], level=_num(r.get("level")), dE=de, dQ=dq,
            e_direction=str(r.get("e_direction", "")), q_direction=str(r.get("q_direction", "")),
            p_paradox=_num(r.get("p_paradox"), 1.0), p_paradox_adjusted=_num(r.get("p_paradox_adjusted"), 1.0),
            quality_key=str(r.get("quality_key") or ""), quick=bool(r.get("quick")),
            params=dict(r.get("params") or {})))
    return VerdictSet(regimes, str(corr.get("method", "holm")), _num(corr.get("alpha"), 0.05),
                      int(corr.get("num_comparisons", len(regimes))), list(d.get("excluded_quick") or []))


def _from_study(st: StudyResult, kept: list[dict], q: str, e_key: str, alpha: float,
                method: str) -> tuple[VerdictSet, list[Comparison], list[str]] | str:
    """The study's own verdicts, or the reason they cannot be used here."""
    block = st.metrics.get("verdicts")
    if not isinstance(block, dict):
        return "the study wrote no verdicts"
    if e_key != st.e_key or q != st.quality_key:
        return f"the study's verdicts are for {st.e_key} and {st.quality_key}"
    try:
        vs = verdicts_from_dict(block)
    except (KeyError, TypeError, ValueError) as err:
        return f"the study's verdicts block is unusable ({err})"
    if vs.method != method or not math.isclose(vs.alpha, alpha):
        return f"the study's verdicts use {vs.method} at {vs.alpha:g}; asked for {method} at {alpha:g}"
    other = {v.quality_key for v in vs.regimes} - {"", q}
    if other:
        return f"the study's verdicts are for quality {sorted(other)}, not {q}"
    labels = {r["label"]: r for r in kept}
    member_of = {m: r for r in kept for m in r.get("members", [])[1:]}
    doubled = [v.label for v in vs.regimes if v.label not in labels and v.label in member_of]
    if doubled:
        return f"the study's verdicts count merged regimes separately ({', '.join(doubled)})"
    comps = [_comparison(labels.get(v.label), v, q, e_key, st.quick) for v in vs.regimes]
    have = {v.label for v in vs.regimes}
    uncompared = [f"{display_name(r)}: no verdict in the study's verdicts block"
                  for r in kept if r["label"] not in have]
    uncompared += [f"{lab}: {QUICK_LABEL}, left out" for lab in vs.excluded_quick]
    return vs, comps, uncompared


def study_verdicts(st: StudyResult, include_quick: bool = False, alpha: float = 0.05, method: str = "holm",
                   quality_key: str | None = None, e_key: str | None = None,
                   equivalent: dict[str, str] | None = None) -> StudyVerdicts | None:
    """Verdicts of a study's regimes after merging identical ones (``merge_regimes``).

    Uses the study's own ``verdicts`` block when it is for the same E and quality keys, every verdict follows
    from its intervals, and it does not count merged regimes separately; otherwise ``classify_regimes`` over
    every regime with per-seed values (``alpha``, ``method``). A smoke run gives no comparisons unless
    ``include_quick`` (then every comparison is marked ``quick``). None when the study has no quality key or
    no regimes."""
    q = quality_key or st.quality_key
    e_key = e_key or st.e_key
    regimes = st.metrics.get("regimes") or []
    if not q or not regimes:
        return None
    kept, merged = merge_regimes(regimes, st.metrics.get("merged"), equivalent)
    kept, reference = _counted(kept)
    budget, source = st.budget()
    base = dict(study=st.name, quality_key=q, quality_label=st.quality_label if q == st.quality_key else q,
                e_key=e_key, merged=merged, quick=st.quick, budget=_budget_text(budget, source))
    if st.quick and not include_quick:
        return StudyVerdicts(comparisons=[], correction=method, alpha=alpha, num_comparisons=0, source="none",
                             note=f"{QUICK_LABEL}: left out of every finding (--include-quick shows it)", **base)
    higher = list(st.metrics.get("higher_is_better") or [])
    if (st.metrics.get("quality") or {}).get("higher_is_better") and q == st.quality_key:
        higher.append(q)
    got = _from_study(st, kept, q, e_key, alpha, method) if not st.quick else "the run is a smoke run"
    note = ""
    if isinstance(got, str):
        note = got if isinstance(st.metrics.get("verdicts"), dict) else ""
        vs, comps, uncompared = _recompute(kept, q, e_key, higher, st.quick, include_quick, alpha, method)
        src = "recomputed"
    else:
        (vs, comps, uncompared), src = got, "study"
    return StudyVerdicts(comparisons=comps, correction=vs.method, alpha=vs.alpha, num_comparisons=vs.num_comparisons,
                         source=src, note=note, uncompared=uncompared + reference, **base)


def secondary_verdicts(st: StudyResult, primary: StudyVerdicts, include_quick: bool = False, alpha: float = 0.05,
                       method: str = "holm") -> list[StudyVerdicts]:
    """The second questions, each its own corrected family: the study's E against every alternative quality key
    (``quality_p0`` and ``alt_quality_keys``, e.g. the distances to the data), and ``E_exact`` / ``E_true_ode``
    (against the exact PF-ODE) against the primary quality key, where the regimes have them."""
    regimes = st.metrics.get("regimes") or []
    if not regimes or primary.source == "none":
        return []
    first = regimes[0].get("methods", {}).get("cd", {})
    p0 = (st.metrics.get("quality_p0") or {}).get("key")
    alts = [*([p0] if p0 else []), *(st.metrics.get("alt_quality_keys") or [k for k in DEFAULT_ALT_KEYS if k in first])]
    alts = list(dict.fromkeys(alts))
    pairs = [(primary.e_key, k) for k in alts if k != primary.quality_key and k in first]
    pairs += [(k, primary.quality_key) for k in EXACT_E_KEYS if k in first and k != primary.e_key]
    out = []
    for e_key, q in pairs:
        sv = study_verdicts(st, include_quick, alpha, method, quality_key=q, e_key=e_key)
        if sv is not None and sv.comparisons:
            out.append(sv)
    return out


def regime_verdicts(study: dict, quality_key: str | None = None, e_key: str = "E", alpha: float = 0.05,
                    method: str = "holm", include_quick: bool = False) -> list[Comparison]:
    """Corrected comparisons of every regime of a metrics dict in the regime schema (identical regimes merged;
    family = the regimes given). Kept for the studies' own summaries."""
    q = quality_key or (study.get("quality") or {}).get("key")
    if not q:
        return []
    kept, _ = _counted(merge_regimes(study.get("regimes") or [], study.get("merged"))[0])
    _, comps, _ = _recompute(kept, q, e_key, study.get("higher_is_better") or [], bool(study.get("quick")),
                             include_quick, alpha, method)
    return comps


def compare_methods(regime: dict, quality_key: str, e_key: str = "E", alpha: float = 0.05) -> Comparison | None:
    """The comparison of one regime on its own (a family of one: no correction); None when it cannot be made."""
    _, comps, _ = _recompute([copy.deepcopy(regime)], quality_key, e_key, [], False, True, alpha, "none")
    return comps[0] if comps else None
