"""Finding and loading results folders for ``studies.report``: the newest run of each study, smoke-run detection,
identical-regime merging; older metrics formats are converted by ``studies.report_schema`` (re-exported here)."""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .report_schema import METHODS, score_error_regimes, sdxl_regimes, to_regimes
from .stats import is_quick, merge_identical_rows

__all__ = [
    "STUDIES",
    "METHODS",
    "METHOD_LABEL",
    "QUICK_LABEL",
    "StudyResult",
    "folder_is_quick",
    "result_files",
    "find_runs",
    "find_latest",
    "load_study",
    "solver_equivalences",
    "merge_regimes",
    "display_name",
    "score_error_regimes",
    "sdxl_regimes",
    "to_regimes",
]

#: studies the report looks for, in report order (the last two only when present)
STUDIES = ["score_error", "latent_space", "inductive_bias", "solver_ablation", "sdxl_table", "image_world",
           "paradox_map"]
METHOD_LABEL = {"cd": "CD", "direct_cd": "Direct CD"}
#: the label every smoke (``--quick``) result carries wherever the report shows it
QUICK_LABEL = "smoke run — not evidence"
#: the old convention: ``results/<study>/<timestamp>-quick`` (``~N`` when the name was taken)
_QUICK_FOLDER = re.compile(r"-quick(~\d+)?$")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _result_file(folder: Path) -> Path | None:
    """``metrics.json``, else ``table.json`` (``studies.sdxl_table``), else None."""
    for name in ("metrics.json", "table.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def folder_is_quick(folder: Path, metrics: Any = None, config: Any = None) -> bool:
    """A smoke run: ``metrics["quick"]`` is true, or the folder name ends in ``-quick`` (the old convention),
    or ``config.json`` records ``_provenance.quick: true``. ``metrics`` / ``config`` are read when omitted."""
    folder = Path(folder)
    if _QUICK_FOLDER.search(folder.name):
        return True
    if metrics is None:
        f = _result_file(folder)
        metrics = _read_json(f) if f else None
    if isinstance(metrics, dict) and is_quick(metrics):
        return True
    if config is None:
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    prov = config.get("_provenance") if isinstance(config, dict) else None
    return bool(isinstance(prov, dict) and prov.get("quick"))


def result_files(results: Path) -> list[Path]:
    """Every ``metrics.json`` under ``results``, and every ``table.json`` without one beside it."""
    results = Path(results)
    if not results.is_dir():
        return []
    return list(results.rglob("metrics.json")) + [p for p in results.rglob("table.json")
                                                    if not (p.parent / "metrics.json").exists()]


def find_runs(results: Path, study: str, files: list[Path] | None = None) -> list[Path]:
    """Every results folder of ``study`` under ``results``, newest first (``files``: ``result_files(results)``).

    Folders under ``results/<study>/`` holding ``metrics.json`` (or ``table.json``) come first; only when there
    are none, any folder whose ``metrics.json`` says ``"study": <study>`` (so variants kept elsewhere, e.g.
    ``results/extra/...``, never shadow the main runs). Newest = latest modification time of that file."""
    results = Path(results)
    files = result_files(results) if files is None else files
    owned, tagged = [], []
    for f in files:
        rel = f.parent.relative_to(results).parts
        if rel and rel[0] == study:
            owned.append(f)
        elif f.name == "metrics.json":
            data = _read_json(f)
            if isinstance(data, dict) and data.get("study") == study:
                tagged.append(f)
    pool = owned or tagged
    return [f.parent for f in sorted(pool, key=lambda f: f.stat().st_mtime, reverse=True)]


def find_latest(results: Path, study: str, include_quick: bool = False) -> Path | None:
    """Newest results folder of ``study`` (``find_runs``); smoke runs (``folder_is_quick``) are passed over
    unless ``include_quick``. None when there is none."""
    for folder in find_runs(results, study):
        if include_quick or not folder_is_quick(folder):
            return folder
    return None


@dataclass
class StudyResult:
    """One results folder: ``metrics`` in the regime schema, the study's ``table.md``, its PNGs, its
    ``config.json`` and whether it is a smoke run. ``skipped``: newer smoke-run folders passed over."""

    name: str
    folder: Path
    metrics: dict
    table_md: str
    pngs: list[Path]
    config: dict = field(default_factory=dict)
    quick: bool = False
    skipped: list[Path] = field(default_factory=list)

    @property
    def quality_key(self) -> str | None:
        return (self.metrics.get("quality") or {}).get("key")

    @property
    def e_key(self) -> str:
        """The study's ODE-error key: its verdicts' ``e_key``, else ``E``, else ``E_solver`` when only that exists."""
        v = self.metrics.get("verdicts")
        if isinstance(v, dict) and v.get("e_key"):
            return str(v["e_key"])
        if self.metrics.get("e_key"):
            return str(self.metrics["e_key"])
        regimes = self.metrics.get("regimes") or [{}]
        first = (regimes[0].get("methods") or {}).get("cd", {})
        return "E_solver" if "E" not in first and "E_solver" in first else "E"

    @property
    def quality_label(self) -> str:
        q = self.metrics.get("quality") or {}
        return str(q.get("label") or q.get("key") or "")

    def budget(self) -> tuple[dict, str]:
        """``(budget, source)``: the study's ``budget`` block, else the training keys of ``config.json``."""
        b = self.metrics.get("budget")
        if isinstance(b, dict) and b:
            return b, "metrics.json"
        train = self.config.get("train") if isinstance(self.config.get("train"), dict) else {}
        out = {k: train[k] for k in ("train_steps", "batch_size", "lr", "ema_rate") if k in train}
        for k in ("budgets", "init_steps"):
            if k in self.config:
                out[k] = self.config[k]
        return (out, "config.json") if out else ({}, "")

    def comparisons(self, e_key: str = "E") -> list:
        """Corrected CD / Direct CD comparisons of this study's regimes (``report_evidence.regime_verdicts``)."""
        from .report_verdicts import regime_verdicts

        return regime_verdicts(self.metrics, e_key=e_key) if self.quality_key else []


def load_study(name: str, folder: Path) -> StudyResult:
    """Read ``metrics.json`` (or ``table.json``), ``table.md``, ``config.json`` and the PNGs of one results folder."""
    folder = Path(folder)
    mfile = _result_file(folder)
    if mfile is None:
        raise FileNotFoundError(f"{folder}: no metrics.json or table.json")
    metrics = json.loads(mfile.read_text())
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    config = config if isinstance(config, dict) else {}
    table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    quick = folder_is_quick(folder, metrics, config)
    if name == "score_error" and "runs" in metrics and "regimes" not in metrics:
        metrics = score_error_regimes(metrics)
    elif name == "sdxl_table" and mfile.name == "table.json":
        metrics = sdxl_regimes(metrics)
    return StudyResult(name, folder, to_regimes(name, metrics), table, sorted(folder.glob("*.png")), config, quick)


# --------------------------------------------------------------------------------------------------------------
# identical regimes
# --------------------------------------------------------------------------------------------------------------
def solver_equivalences() -> dict[str, str]:
    """``{name: equivalent_to}`` of the solvers in ``odecm.solvers.SOLVERS`` that declare one (e.g. EDM's Euler
    is DDIM in exact arithmetic); empty when the registry has no such declarations."""
    try:
        from odecm.solvers import SOLVERS
    except ImportError:  # pragma: no cover - odecm is always installed with studies
        return {}
    return {str(n): str(s.equivalent_to) for n, s in SOLVERS.items() if getattr(s, "equivalent_to", None)}


def _find_regime(regs: list[dict], name: str, match: dict | None) -> dict | None:
    """The regime labelled ``name``, else the one with ``name`` as a parameter value and every ``match`` item."""
    for r in regs:
        if r.get("label") == name:
            return r
    for r in regs:
        p = r.get("params", {})
        named = {part for v in p.values() for part in str(v).split("=")}  # "ddim=euler": a merged row's name
        if name in named and all(p.get(k, v) == v for k, v in (match or {}).items()):
            return r
    return None


_REASONS = {"declared": "declared equivalent by odecm.solvers", "numerical": "every per-seed value agrees"}


def merge_regimes(regimes: Sequence[dict], study_merged: Sequence[dict] | None = None,
                  equivalent: dict[str, str] | None = None, rtol: float = 1e-12) -> tuple[list[dict], list[dict]]:
    """Regimes that are the same computation, shown once: ``(kept regimes, merge records)``.

    Three sources, in order: the study's own ``merged`` records (``{"kept", "dropped", "reason", "match"}``,
    names being labels or parameter values such as a solver name); solvers declared equivalent (``equivalent``,
    default ``solver_equivalences()``: regime B with ``params.solver = euler`` merges into regime A with
    ``params.solver = ddim`` and every other parameter equal); and numerical agreement of every per-seed value of
    both methods to ``rtol`` (``studies.stats.merge_identical_rows``). Kept regimes are copies with ``members``
    (their own label first, then every label or name merged into them); records carry ``source``."""
    regs = [copy.deepcopy(dict(r)) for r in regimes]
    for r in regs:
        label = str(r.get("label", ""))  # a study may already name its merged members in the label ("ddim=euler N=4")
        r["members"] = [label] + [str(x) for x in r.get("merged_from", []) if str(x) not in label]
    records: list[dict] = []
    for rec in study_merged or []:
        kept = _find_regime(regs, str(rec.get("kept")), rec.get("match"))
        drop = _find_regime(regs, str(rec.get("dropped")), rec.get("match"))
        if kept is None:
            continue
        if drop is kept:  # already one row named with both (the study merged it)
            drop = None
        if drop is not None:
            kept["members"] += drop["members"]
            regs.remove(drop)
        elif not any(str(rec.get("dropped")) in m for m in kept["members"]):
            kept["members"].append(str(rec.get("dropped")))
        reason = str(rec.get("reason", "merged"))
        dropped = drop["label"] if drop is not None else str(rec.get("dropped"))
        records.append({"kept": kept["label"], "dropped": dropped,
                        "reason": _REASONS.get(reason, reason) + " (merged by the study)", "source": "study",
                        "max_abs_diff": rec.get("max_abs_diff"), "max_rel_diff": rec.get("max_rel_diff")})
    equivalent = solver_equivalences() if equivalent is None else equivalent

    def others(r: dict) -> dict:
        return {k: v for k, v in r.get("params", {}).items() if k != "solver"}

    declared: dict[str, str] = {}
    for i, r in enumerate(regs):
        s = r.get("params", {}).get("solver")
        target = equivalent.get(str(s)) if s is not None else None
        if target is None:
            continue
        j = next((j for j, q in enumerate(regs) if str(q.get("params", {}).get("solver")) == target
                  and others(q) == others(r) and j != i), None)
        if j is not None:
            declared[str(i)] = str(j)
    rows = [{"_id": str(i), "methods": r.get("methods", {})} for i, r in enumerate(regs)]
    res = merge_identical_rows(rows, name_key="_id", equivalent=declared, metric_keys=("methods",), rtol=rtol,
                               record_key=None)
    for m in res.merged:
        k, d = regs[int(m.kept)], regs[int(m.dropped)]
        k["members"] += d["members"]
        records.append({"kept": k["label"], "dropped": d["label"], "source": m.reason,
                        "reason": ("declared equivalent by odecm.solvers" if m.reason == "declared"
                                   else f"every per-seed value agrees to {rtol:g}"),
                        "max_abs_diff": m.max_abs_diff, "max_rel_diff": m.max_rel_diff})
    dropped = {int(m.dropped) for m in res.merged}
    return [r for i, r in enumerate(regs) if i not in dropped], records


def display_name(r: dict) -> str:
    """A regime's name with every member merged into it: ``"ddim N=10 = euler N=10"``; when its CD side is
    not plain CD or its other side not Direct CD (paradox_map's ``direct_first`` / ``k`` axes: ``cell.base``,
    ``cell.compared``), the name says what stands there."""
    name = " = ".join(dict.fromkeys(r.get("members") or [r.get("label", "")]))
    cell = r.get("cell") or {}
    sides = [f"{side} side: {cell[key]}" for key, side, plain in (("base", "CD", "cd"), ("compared", "Direct CD", "direct_cd"))
             if cell.get(key) not in (None, plain)]
    return f"{name} ({'; '.join(sides)})" if sides else name
