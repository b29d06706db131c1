"""The metrics.json schema of every toy study, and the evidence built into it (``studies.stats``).

Schema (``studies.report`` reads it; keep it stable)::

    {"study": str, "quick": bool,                      # quick: a smoke run, never evidence
     "budget": {"train_steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "ema_rate",
                "init_steps", "grid_size", "convergence_rule"},
     "quality": {"key", "label", "higher_is_better"},   # primary: a distance to the teacher's samples
     "quality_p0": {"key", "label"} | null,             # the second question (distance to p_0)
     "regimes": [{"label", "group", "params", "switches",
                  "methods": {"cd": {metric: {"mean", "std", "values": [per seed]}}, "direct_cd": {...}},
                  "converged": {"cd": [bool per seed], "direct_cd": [...]},
                  "differences": {metric: paired_difference(cd - direct_cd).to_dict()},   # 95%, uncorrected
                  "eval_intervals": {"methods": {m: {metric: bootstrap}}, "paired": {metric: bootstrap}},
                  "merged_from": [names merged into this row], ...}],
     "verdicts": classify_regimes(primary).to_dict(), "verdicts_p0": classify_regimes(p_0 key).to_dict(),
     "merged": [MergeRecord.to_dict()],
     "floor": {metric: {"mean", "sd", "values"}},      # finite-sample floor, >= 10 draws
     "summary": str, "timing": {...}, ...study-specific blocks}

Per-seed ``values`` are in the same seed order for every method, so ``cd[i]`` and ``direct_cd[i]`` are
a pair (same seed, hence the same pool, evaluation noise and reference). ``converged`` applies the rule
"E within 5% of its value at the previous doubling of the budget" (``converged_flags``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .common import stat
from .stats import (RegimeInput, bootstrap_interval, classify_regimes, floor_distribution, merge_identical_rows,
                    paired_bootstrap, paired_difference)

__all__ = ["CONVERGENCE_RULE", "converged_flags", "regime_entry", "add_differences", "eval_intervals",
           "solver_equivalences", "merge_regimes", "verdicts", "floor_block", "budget_block", "budget_line", "summary_line",
           "interval_levels", "METHODS"]

METHODS = ("cd", "direct_cd")
CONVERGENCE_TOL = 0.05
CONVERGENCE_RULE = "E within 5% of its value at half the budget (the previous doubling)"


def converged_flags(E_now: Sequence[float], E_half: Sequence[float], tol: float = CONVERGENCE_TOL) -> list[bool]:
    """Per member: ``|E(s) - E(s/2)| <= tol E(s/2)``."""
    return [bool(abs(a - b) <= tol * abs(b)) for a, b in zip(E_now, E_half)]


def regime_entry(label: str, group: str, params: dict, per_method: Mapping[str, Mapping[str, Sequence[float]]],
                 switches: dict | None = None, converged: Mapping[str, Sequence[bool]] | None = None,
                 **extra: Any) -> dict:
    """One regime of the schema; ``per_method[m][metric]`` holds the per-seed values."""
    entry = {"label": label, "group": group, "params": dict(params), "switches": dict(switches or {}),
             "methods": {m: {k: stat(v) for k, v in vals.items() if len(v)} for m, vals in per_method.items()}}
    if converged is not None:
        entry["converged"] = {m: [bool(b) for b in v] for m, v in converged.items()}
    entry.update(extra)
    return entry


def add_differences(regime: dict, keys: Sequence[str] | None = None, level: float = 0.95) -> dict:
    """``regime["differences"][k]``: paired t-analysis over seeds of ``cd - direct_cd`` (uncorrected)."""
    cd, dcd = regime["methods"].get("cd", {}), regime["methods"].get("direct_cd", {})
    out = {}
    for k in keys or sorted(set(cd) & set(dcd)):
        a, b = cd.get(k, {}).get("values"), dcd.get(k, {}).get("values")
        if a and b and len(a) == len(b) and all(v is not None and np.isfinite(v) for v in [*a, *b]):
            out[k] = paired_difference(a, b, level=level).to_dict()
    regime["differences"] = out
    return regime


def eval_intervals(per_sample: Mapping[str, Mapping[str, Sequence[np.ndarray]]], n_resamples: int = 1000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """Bootstrap intervals over evaluation samples (evaluation noise only, not seed-to-seed variation).

    ``per_sample[method][metric]`` is a list over seeds of per-sample arrays (e.g. ``E_i``, ``-log p_0``,
    a 0/1 mode indicator); the seeds' samples are pooled, so the statistic is the mean over every
    seed's evaluation samples. ``paired``: ``cd - direct_cd`` with the same samples resampled together
    (pairs = same seed, same noise index)."""
    methods = {m: {k: bootstrap_interval(np.concatenate([np.asarray(a, float) for a in arrs]),
                                         n_resamples=n_resamples, seed=seed, level=level).to_dict()
                   for k, arrs in keys.items()} for m, keys in per_sample.items()}
    paired = {}
    if "cd" in per_sample and "direct_cd" in per_sample:
        for k in sorted(set(per_sample["cd"]) & set(per_sample["direct_cd"])):
            a = np.concatenate([np.asarray(x, float) for x in per_sample["cd"][k]])
            b = np.concatenate([np.asarray(x, float) for x in per_sample["direct_cd"][k]])
            if a.shape == b.shape:
                paired[k] = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, level=level).to_dict()
    return {"methods": methods, "paired": paired, "n_resamples": n_resamples, "level": level}


def solver_equivalences() -> dict[str, str]:
    """``{name: equivalent_to}`` declared in the solver registry (e.g. ``{"euler": "ddim"}``)."""
    from odecm.solvers import SOLVERS

    return {name: cls.equivalent_to for name, cls in SOLVERS.items() if getattr(cls, "equivalent_to", None)}


def merge_regimes(regimes: Sequence[dict], name_param: str = "solver", match_params: Sequence[str] = (),
                  equivalent: Mapping[str, str] | None = None, rtol: float = 1e-12) -> tuple[list[dict], list[dict]]:
    """Report regimes whose computations are identical once (``studies.stats.merge_identical_rows``).

    Regimes with equal ``params[p]`` for every ``p`` in ``match_params`` are compared on
    ``params[name_param]``: merged when declared equivalent (default: the solver registry's
    ``equivalent_to``, e.g. EDM Euler = DDIM) or when every per-seed metric value agrees to ``rtol``.
    The kept regime's ``params[name_param]`` and label name every merged member (``"ddim=euler"``) and
    ``merged_from`` lists them. Returns ``(kept regimes, merge records)``."""
    if not regimes:
        return [], []
    eq = solver_equivalences() if equivalent is None else dict(equivalent)
    rows = [{"name": str(r["params"].get(name_param, r["label"])), **{p: r["params"].get(p) for p in match_params},
             "m": {m: {k: v["values"] for k, v in vals.items()} for m, vals in r["methods"].items()}, "i": i}
            for i, r in enumerate(regimes)]
    res = merge_identical_rows(rows, name_key="name", match_keys=list(match_params), equivalent=eq,
                               metric_keys=["m"], rtol=rtol)
    kept = []
    for row in res.rows:
        r = dict(regimes[row["i"]])
        merged = list(row.get("merged_from", []))
        r["merged_from"] = merged
        if merged:
            name = row["name"]
            joined = "=".join([name, *merged])
            r["params"] = {**r["params"], name_param: joined}
            r["label"] = r["label"].replace(name, joined, 1) if name in r["label"] else f"{r['label']} (= {'='.join(merged)})"
        kept.append(r)
    return kept, [m.to_dict() for m in res.merged]


def verdicts(regimes: Sequence[dict], quality_key: str, higher_is_better: bool = False, e_key: str = "E",
             quick: bool = False, method: str = "holm", alpha: float = 0.05) -> dict:
    """``classify_regimes`` over the regimes holding both methods with ``e_key`` and ``quality_key``
    (paired per seed), corrected across them; quick runs are classified but tagged ``quick``."""
    inputs = []
    for r in regimes:
        ms = r["methods"]
        if not all(m in ms and e_key in ms[m] and quality_key in ms[m] for m in METHODS):
            continue
        e_cd, e_dcd = ms["cd"][e_key]["values"], ms["direct_cd"][e_key]["values"]
        q_cd, q_dcd = ms["cd"][quality_key]["values"], ms["direct_cd"][quality_key]["values"]
        if any(v is None or not np.isfinite(v) for v in [*e_cd, *e_dcd, *q_cd, *q_dcd]):
            continue
        inputs.append(RegimeInput.from_methods(r["label"], e_cd, e_dcd, q_cd, q_dcd, higher_is_better=higher_is_better,
                                               quality_key=quality_key, quick=quick, params=dict(r["params"])))
    out = classify_regimes(inputs, alpha=alpha, method=method, include_quick=True).to_dict()
    out["e_key"] = e_key
    return out


def floor_block(draw, num_draws: int = 10, seed: int = 0) -> dict[str, dict]:
    """A floor as a distribution: ``draw(s) -> {metric: value}`` over ``num_draws`` (>= 10) seeds."""
    dist = floor_distribution(draw, num_draws=num_draws, seed=seed)
    return {k: {"mean": v.mean, "sd": v.sd, "values": v.values} for k, v in dist.items()}


def budget_block(train, init_steps: int, grid_size: int | None, **extra: Any) -> dict:
    """The training budget every finding states."""
    return {"train_steps": train.train_steps, "batch_size": train.batch_size, "lr": train.lr,
            "lr_schedule": train.lr_schedule, "warmup_steps": train.warmup_steps, "ema_rate": train.ema_rate,
            "init_steps": init_steps, "init": "teacher" if init_steps else "scratch", "grid_size": grid_size,
            "convergence_rule": CONVERGENCE_RULE, **extra}


def budget_line(b: Mapping, details: str, steps: Any = None) -> str:
    """The sentence a report states a ``budget_block`` ``b`` in: ``Budget: <steps> steps x batch .. per member,
    lr .. (<schedule>, .. warm-up), <details>. Converged = seeds whose <rule>.`` (``steps``: ``b['train_steps']``
    unless given)."""
    return (f"Budget: {b['train_steps'] if steps is None else steps} steps x batch {b['batch_size']} per member, "
            f"lr {b['lr']:g} ({b['lr_schedule']}, {b['warmup_steps']} warm-up), {details}. "
            f"Converged = seeds whose {b['convergence_rule']}.")


def init_text(b: Mapping, init: str) -> str:
    """``init``, then `` (<init_steps> regression steps)`` when the budget ``b`` has any."""
    return init + (f" ({b['init_steps']} regression steps)" if b["init_steps"] else "")


def summary_line(study_verdicts: Mapping, quick: bool, quality_label: str) -> str:
    """One line: verdict counts across the regimes counted, and the level the intervals were taken at: each
    regime's paired t-interval over seeds is at its corrected level ``1 - alpha_i``
    (``studies.stats.adjusted_levels``: ``1 - alpha / m`` for Bonferroni, Holm's step-down level, ...), which
    excludes 0 exactly when the corrected test rejects."""
    regs = study_verdicts.get("regimes", [])
    counts: dict[str, int] = {}
    for r in regs:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    corr = study_verdicts.get("correction", {})
    parts = ", ".join(f"{v} {n}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    paradox = [r["label"] for r in regs if r["verdict"] == "paradox"]
    line = (f"{len(paradox)}/{len(regs)} regimes show the paradox (Direct CD lower E and worse {quality_label}: "
            f"both paired intervals over seeds exclude 0 at {interval_levels(regs, corr)})"
            + (f": {', '.join(paradox)}" if paradox else "") + f". Verdicts: {parts or 'none'}.")
    return ("[quick: not evidence] " if quick else "") + line


def interval_levels(regimes: Sequence[Mapping], correction: Mapping) -> str:
    """The intervals' levels in words, e.g. ``"the holm-corrected levels 97.5%-99.2% (family-wise error 0.05
    over 3 regimes)"`` or ``"95% (no correction)"``."""
    method, alpha, m = correction.get("method", "?"), correction.get("alpha"), correction.get("num_comparisons", 0)
    levels = sorted({round(100 * float(r["level"]), 2) for r in regimes if r.get("level") is not None})
    shown = "-".join(f"{x:g}%" for x in dict.fromkeys([levels[0], levels[-1]])) if levels else "?"
    if method == "none":
        return f"{shown} (no correction)"
    family = f"family-wise error {alpha:g}" if method in ("holm", "bonferroni") and alpha is not None else (
        f"false coverage rate {alpha:g}" if method == "bh" and alpha is not None else "")
    return (f"the {method}-corrected level{'s' if len(levels) > 1 else ''} {shown} "
            f"({family + ' ' if family else ''}over {m} regime{'s' if m != 1 else ''})")
