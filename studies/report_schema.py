"""Older metrics formats converted to the regime schema ``studies.report`` reads: ``score_error``'s per-seed
``runs``, ``sdxl_table``'s ``table.json`` and flat ``rows`` tables (re-exported by ``studies.report_io``).

Regime schema: ``{"regimes": [{"label", "params", "switches", "group", "methods": {method: {metric:
stat}}}], "quality": {"key", "label"}, ...}`` with ``method`` one of ``METHODS``.
"""
from __future__ import annotations

import json
from typing import Any

from .common import stat

__all__ = ["METHODS", "KNOWN_METRICS", "score_error_regimes", "sdxl_regimes", "to_regimes"]

#: the two methods every regime compares
METHODS = ("cd", "direct_cd")


def _seeded_stat(pairs: list[tuple[Any, float]]) -> dict:
    """``stat`` of the values ordered by seed, with ``seeds`` recorded (so the two methods pair by seed)."""
    pairs = sorted(pairs, key=lambda p: (p[0] is None, p[0] if p[0] is not None else 0))
    out = stat([v for _, v in pairs])
    if all(s is not None for s, _ in pairs):
        out["seeds"] = [s for s, _ in pairs]
    return out


#: score_error run fields that identify a run rather than measure it
_SCORE_ERROR_IDS = {"teacher", "method", "solver", "seed", "score_error"}
_SCORE_ERROR_RENAME = {"E_solver": "E", "E_true_ode": "E_exact"}


def score_error_regimes(metrics: dict) -> dict:
    """``studies.score_error`` (flat per-seed ``runs``) -> regime schema: one regime per (teacher, solver).

    ``E`` = ``E_solver`` (eq. 6, against the teacher's own solver), ``E_exact`` = ``E_true_ode``; every other
    numeric field is kept under its own name. Primary quality = ``w2_teacher`` (W2 to the teacher's exact-ODE
    samples: the evidence rules' comparison) when the runs have it, else ``w2_p0`` (to the data). The
    score-error switch is the teacher's measured score error (0 for the exact teacher)."""
    teachers = metrics.get("teachers", {})
    groups: dict[tuple, dict] = {}
    values: dict[tuple, dict[str, dict[str, list]]] = {}
    for row in metrics.get("runs", []):
        if row.get("method") not in METHODS:
            continue
        key = (row["teacher"], row.get("solver"))
        info = teachers.get(row["teacher"], {})
        level = 0.0 if info.get("kind") == "exact" else float(row.get("score_error", 0.0))
        groups.setdefault(key, {"label": f"{row['teacher']} {row.get('solver')}", "group": "score_error",
                                "params": {"teacher": row["teacher"], "solver": row.get("solver"),
                                           "score_error": level},
                                "switches": {"score_error": level, "decoder": "identity"}, "methods": {}})
        per = values.setdefault(key, {}).setdefault(row["method"], {})
        for k, v in row.items():
            if k in _SCORE_ERROR_IDS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            per.setdefault(_SCORE_ERROR_RENAME.get(k, k), []).append((row.get("seed"), float(v)))
    for key, g in groups.items():
        g["methods"] = {m: {k: _seeded_stat(v) for k, v in per.items()} for m, per in values[key].items()}
    has_teacher = any("w2_teacher" in m for g in groups.values() for m in g["methods"].values())
    out = {k: v for k, v in metrics.items() if k not in ("summary", "runs")}
    out["regimes"] = list(groups.values())
    if has_teacher:
        out["quality"] = {"key": "w2_teacher", "label": "W2 of one-step samples to the teacher's samples "
                                                        "(the teacher's exact-ODE samples from independent noise)"}
        out["alt_quality_keys"] = ["w2_p0", "mmd2_p0", "mmd2_teacher"]
    else:
        out["quality"] = {"key": "w2_p0", "label": "W2 of one-step samples to p_0 (data; no teacher-sample distance "
                                                   "in these results)"}
        out["alt_quality_keys"] = ["mmd2_p0"]
    if "higher_is_better" in metrics:
        out["higher_is_better"] = metrics["higher_is_better"]
    if isinstance(metrics.get("floor_p0"), dict):
        out["floor"] = {f"{k}_p0": v for k, v in metrics["floor_p0"].items()}
    return out


def sdxl_regimes(table: dict) -> dict:
    """``studies.sdxl_table`` ``table.json`` -> regime schema: one regime per (solver, k steps); ``E`` = latent
    ODE error, quality = FID against the teacher's samples. Single runs: one value each, so no interval."""
    groups: dict[tuple, dict] = {}
    for row in table.get("rows", []):
        if row.get("method") not in METHODS or row.get("status", "ok") != "ok":
            continue
        for k, vals in (row.get("k") or {}).items():
            if vals.get("ode_error_latent") is None or vals.get("fid_teacher") is None:
                continue
            g = groups.setdefault((row.get("solver"), k), {
                "label": f"SDXL {row.get('solver')} k={k}", "group": "sdxl",
                "params": {"solver": row.get("solver"), "k": k},
                "switches": {"score_error": "sdxl", "decoder": "vae"}, "methods": {}})
            g["methods"][row["method"]] = {"E": stat([vals["ode_error_latent"]]), "fid": stat([vals["fid_teacher"]]),
                                           **({"fd_dino": stat([vals["fd_dino_teacher"]])}
                                              if vals.get("fd_dino_teacher") is not None else {})}
    return {"study": "sdxl_table", "quality": {"key": "fid", "label": "FID against the teacher's samples"},
            "alt_quality_keys": ["fd_dino"], "regimes": list(groups.values())}


KNOWN_METRICS = {"w2", "mmd", "mmd2", "fd", "fid", "fd_dino", "nll", "precision", "recall", "mode_coverage", "clip",
                 "aesthetic"}


def _is_metric(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, dict) and "mean" in v)


def to_regimes(name: str, metrics: dict) -> dict:
    """Metrics in the regime schema: returned unchanged when already there; otherwise converted from a flat
    ``{"rows": [{"method": .., <params>.., <metric>: value | {"mean",..}}]}`` table, grouping rows that share all
    non-metric fields (per-seed values ordered by ``seed`` when rows have one), or left without regimes."""
    if "regimes" in metrics:
        return metrics
    rows = metrics.get("rows")
    out = dict(metrics)
    out.setdefault("study", name)
    if not isinstance(rows, list):
        out["regimes"] = []
        return out
    metric_keys = set(metrics.get("metric_keys", [])) | KNOWN_METRICS
    if (metrics.get("quality") or {}).get("key"):
        metric_keys.add(metrics["quality"]["key"])

    def is_metric(k: str, v: Any) -> bool:
        return _is_metric(v) and (k in metric_keys or k == "E" or k.startswith("E_") or isinstance(v, dict))

    groups: dict[str, dict] = {}
    raw: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("method") not in METHODS:
            continue
        params = {k: v for k, v in row.items() if k not in ("method", "seed") and not is_metric(k, v)}
        key = json.dumps(params, sort_keys=True, default=str)
        groups.setdefault(key, {"label": ", ".join(f"{k}={v}" for k, v in params.items()) or name,
                                "params": params, "methods": {}})
        m = raw.setdefault(key, {}).setdefault(row["method"], {})
        for k, v in row.items():
            if k in params or k in ("method", "seed") or not is_metric(k, v):
                continue
            if isinstance(v, dict):
                m[k] = v if "values" in v else {**v, "values": []}
            else:
                m.setdefault(k, []).append((row.get("seed"), float(v)))
    for key, g in groups.items():
        g["methods"] = {meth: {k: (v if isinstance(v, dict) else _seeded_stat(v)) for k, v in per.items()}
                        for meth, per in raw[key].items()}
    out["regimes"] = list(groups.values())
    return out
