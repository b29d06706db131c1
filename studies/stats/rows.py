"""Result rows: merging rows that are the same computation, and keeping smoke (``quick``) results out of findings."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "MergeRecord",
    "MergeResult",
    "numeric_leaves",
    "merge_identical_rows",
    "is_quick",
    "split_quick",
    "evidence_rows",
    "QUICK_TAG",
]


# ------------------------------------------------------------------ identical rows
def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number inside nested dicts / lists as ``{"path": value}`` (``"E.values.2"``); strings,
    None and other leaves are skipped; bools count as numbers (0 / 1)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(numeric_leaves(v, f"{prefix}{i}."))
    elif hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / torch arrays and scalars
        out.update(numeric_leaves(obj.tolist(), prefix))
    elif isinstance(obj, (int, float)):
        out[prefix[:-1]] = float(obj)
    return out


@dataclass(frozen=True)
class MergeRecord:
    """Row ``dropped`` was merged into row ``kept`` (both by ``name_key``), within the ``match`` values."""

    kept: str
    dropped: str
    reason: str  # "declared" or "numerical"
    match: dict
    max_abs_diff: float  # over the compared metric values (NaN where the metric sets differ)
    max_rel_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeResult:
    """The rows left after merging (input order, copies) and what was merged into what."""

    rows: list[dict]
    merged: list[MergeRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "merged": [m.to_dict() for m in self.merged]}


def _metrics(row: Mapping, name_key: str, match_keys: Sequence[str], metric_keys: Sequence[str] | None,
             record_key: str | None) -> dict[str, float]:
    skip = {name_key, *match_keys, *([record_key] if record_key else [])}
    keys = [k for k in row if k not in skip] if metric_keys is None else list(metric_keys)
    return numeric_leaves({k: row[k] for k in keys if k in row})


def _diffs(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Largest absolute and relative difference over the shared metric paths (NaN when the paths differ;
    NaN against NaN counts as equal, NaN against a number as infinitely different)."""
    if a.keys() != b.keys():
        return math.nan, math.nan
    abs_d = rel_d = 0.0
    for k, x in a.items():
        y = b[k]
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return math.inf, math.inf
            continue
        d = abs(x - y)
        scale = max(abs(x), abs(y))
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / scale if scale > 0 else 0.0)
    return abs_d, rel_d


def _agree(a: dict[str, float], b: dict[str, float], rtol: float, atol: float) -> bool:
    if not a or a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return False
        elif abs(x - y) > atol + rtol * max(abs(x), abs(y)):
            return False
    return True


def _resolve(name: str, equivalent: Mapping[str, str]) -> str:
    seen = [name]
    while name in equivalent:
        name = str(equivalent[name])
        if name in seen:
            raise ValueError(f"equivalence cycle: {' -> '.join(seen + [name])}")
        seen.append(name)
    return name


def merge_identical_rows(rows: Sequence[Mapping], name_key: str = "label", match_keys: Sequence[str] = (),
                         equivalent: Mapping[str, str] | None = None, metric_keys: Sequence[str] | None = None,
                         rtol: float = 1e-12, atol: float = 0.0, record_key: str | None = "merged_from") -> MergeResult:
    """Report rows whose computations are identical once, recording what was merged.

    Rows are dicts; ``row[name_key]`` names the computation (e.g. the solver), ``match_keys`` must be equal
    for two rows to be compared at all (e.g. ``("grid_size", "method")``). Row B is merged into row A with
    the same ``match_keys`` values when

    * declared: ``equivalent`` maps B's name (transitively) to A's name, e.g. ``{"euler": "ddim"}`` from the
      solvers' ``equivalent_to``; merged whatever the numbers say (the largest differences are recorded);
      a declared target that is absent leaves B unmerged;
    * numerical: A comes earlier and every metric value agrees, ``|a - b| <= atol + rtol max(|a|, |b|)``
      (default rtol 1e-12, atol 0) for every number, per seed (NaN agrees only with NaN), over the same
      metric paths.

    Metric values are the numeric leaves (``numeric_leaves``) of ``row[k]`` for ``k`` in ``metric_keys``
    (default: every key except ``name_key``, ``match_keys`` and ``record_key``). Kept rows stay in input
    order, as copies with ``row[record_key]`` = the names merged into them (``record_key=None``: no such
    key). ``merged`` lists one ``MergeRecord`` per dropped row."""
    equivalent = {str(k): str(v) for k, v in (equivalent or {}).items()}
    for k in equivalent:
        _resolve(k, equivalent)  # cycles are errors
    for i, row in enumerate(rows):
        for key in (name_key, *match_keys):
            if key not in row:
                raise KeyError(f"row {i} has no key {key!r}; keys: {sorted(row)}")
    names = [str(r[name_key]) for r in rows]
    matches = [{k: r[k] for k in match_keys} for r in rows]
    metrics = [_metrics(r, name_key, match_keys, metric_keys, record_key) for r in rows]
    parent: dict[int, tuple[int, str]] = {}
    for i, name in enumerate(names):  # declared equivalences
        root = _resolve(name, equivalent)
        if root != name:
            j = next((j for j in range(len(rows)) if names[j] == root and matches[j] == matches[i]), None)
            if j is not None:
                parent[i] = (j, "declared")
    for i in range(len(rows)):  # numerical agreement with an earlier row that is kept so far
        if i in parent:
            continue
        for j in range(i):
            if j not in parent and matches[j] == matches[i] and _agree(metrics[j], metrics[i], rtol, atol):
                parent[i] = (j, "numerical")
                break

    def root_of(i: int) -> int:
        while i in parent:
            i = parent[i][0]
        return i

    kept_ids = [i for i in range(len(rows)) if i not in parent]
    merged_into: dict[int, list[str]] = {i: [] for i in kept_ids}
    records = []
    for i in sorted(parent):
        k = root_of(i)
        merged_into[k].append(names[i])
        a_abs, a_rel = _diffs(metrics[k], metrics[i])
        records.append(MergeRecord(names[k], names[i], parent[i][1], matches[i], a_abs, a_rel))
    kept = []
    for i in kept_ids:
        row = copy.deepcopy(dict(rows[i]))
        if record_key is not None:
            row[record_key] = merged_into[i]
        kept.append(row)
    return MergeResult(kept, records)


# ------------------------------------------------------------------ smoke runs
QUICK_TAG = " [quick: not evidence]"


def is_quick(item: Any) -> bool:
    """True when a row / result dict is marked ``quick: true`` (a smoke run): ``item["quick"]`` for a
    mapping, ``item.quick`` for an object; anything else is not quick."""
    if isinstance(item, Mapping):
        return bool(item.get("quick", False))
    return bool(getattr(item, "quick", False))


def split_quick(items: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """``(evidence, quick)``: the items not marked quick, and those that are (input order kept)."""
    evidence, quick = [], []
    for item in items:
        (quick if is_quick(item) else evidence).append(item)
    return evidence, quick


def evidence_rows(rows: Iterable[Mapping], include_quick: bool = False, label_key: str = "label") -> list[dict]:
    """Rows a finding may use: rows marked quick are dropped, unless ``include_quick``, in which case they
    are kept as copies with ``QUICK_TAG`` appended to ``row[label_key]`` (when present) and
    ``evidence: False``. Other rows are returned as they are."""
    out = []
    for row in rows:
        if not is_quick(row):
            out.append(row)
        elif include_quick:
            tagged = dict(row)
            if label_key in tagged and not str(tagged[label_key]).endswith(QUICK_TAG):
                tagged[label_key] = f"{tagged[label_key]}{QUICK_TAG}"
            tagged["evidence"] = False
            out.append(tagged)
    return out
