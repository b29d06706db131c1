"""Shared plumbing of the ``python -m studies.<name>`` entry points.

* CLI (``odecm.cli``): ``--config FILE`` (YAML / JSON; a run's ``config.json`` replays it),
  ``--set key=value ...`` (dotted keys, YAML values; repeatable, a key given twice is an error),
  ``--quick`` (the study's reduced sweep, a smoke run), ``--out DIR`` (default
  ``results/<study>/<timestamp>``; a folder holding results is refused unless ``--overwrite``),
  ``--threads N`` (torch intra-op threads, N >= 1), ``--no-progress``, ``--check`` (resolve and validate the
  config, check ``--out`` without creating it, print ``ok: ...`` and stop: ``odecm.cli``). ``parse_args`` +
  ``resolve_config``; after the door checks, ``if report_check(args, module, cfg): return``.
* Config: pydantic models via ``odecm.config``, layered in this order (each layer merged key by key into
  the one before): the study's defaults -> ``--config`` file -> quick preset (with ``--quick``) -> ``--set``.
  So ``--quick --config FILE`` is always a smoke run, and ``--set`` always has the last word. Every check
  lives in the config models (field constraints and validators), so unknown keys / bad values raise
  ``odecm.config.ConfigError`` naming the key, the value and what is allowed before any folder is made;
  ``odecm.cli.run_main`` prints them as one line each, without a traceback. ``distinct`` is the shared
  rule of the studies' lists (non-empty, no value twice).
* Results folder: ``config.json`` (the fully resolved config plus ``_provenance``), ``metrics.json``,
  ``table.md`` (also printed), plots (``studies.plotting``: matplotlib, Agg backend).
* Statistics over seeds: ``stat(values) -> {"mean", "std", "values"}`` (std with ddof = 1) and
  ``fmt_stat`` ("mean ± std"); the same schema as ``studies.report``.
* ``seeded(seed)``: a ``torch.Generator`` and the global torch / Python / NumPy RNGs set from one seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union

import numpy as np
import torch
from pydantic import BaseModel
from pydantic_core import PydanticCustomError

from odecm.cli import (InputError, add_config_args, config_from_args, overrides_from, positive_int, provenance,
                       report_check)
from odecm.config import ConfigError, load_config, read_config_file

__all__ = [
    "apply_run_flags",
    "parse_args",
    "resolve_config",
    "report_check",
    "QuickPreset",
    "distinct",
    "check_study_train",
    "results_folder",
    "save_config",
    "open_output",
    "write_json",
    "write_table",
    "markdown_table",
    "stat",
    "fmt",
    "fmt_stat",
    "seeded",
    "set_threads",
    "Timer",
    "ConfigError",
    "InputError",
]

M = TypeVar("M", bound=BaseModel)


# --- command line and configuration ------------------------------------------------------------

def parse_args(study: str, argv: Sequence[str] | None = None, description: str = "") -> argparse.Namespace:
    """The common flags of every study (see module docstring); ``--set`` follows ``odecm.cli``."""
    ap = argparse.ArgumentParser(prog=f"python -m studies.{study}", description=description)
    add_config_args(ap)
    ap.add_argument("--quick", action="store_true", help="the reduced sweep (a smoke run: never evidence)")
    ap.add_argument("--out", default=None, help="results folder (default results/<study>/<timestamp>); "
                                                "refused if it already holds results, unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="clear an existing --out folder first")
    ap.add_argument("--results", default="results", help="results root for the default folder")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: config)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return ap.parse_args(list(argv) if argv is not None else None)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: a quick preset: a dict of overrides, or a function of the configured run returning one
QuickPreset = Union[Mapping[str, Any], Callable[[Any], Mapping[str, Any]]]


def resolve_config(model: type[M], args: argparse.Namespace, quick: QuickPreset | None = None) -> M:
    """The study's defaults -> ``--config`` file -> ``quick`` (with ``--quick``) -> ``--set`` overrides, validated.

    Every layer is merged key by key into the one before, starting from the study's own defaults
    (``model()``), so ``--set train.lr=1e-3`` changes the learning rate and keeps the study's other
    ``train`` values (not the class defaults of ``TrainConfig``), and the quick preset overrides what a
    config file sets (``--quick --config FILE`` is a smoke version of that file's run). ``quick`` may be a
    function of the configured run (defaults, file and ``--set``, validated without the preset), e.g. the
    first and last value of each axis of the configured map; ``--set`` is applied after it either way."""
    base = model().model_dump(mode="json")
    if not getattr(args, "quick", False) or quick is None:
        return config_from_args(model, args, base=base)
    if callable(quick):
        quick = quick(config_from_args(model, args, base=base))
    path = getattr(args, "config", None)
    layered = _deep_merge(base, read_config_file(path)) if path is not None else base
    return load_config(model, None, overrides_from(args), base=_deep_merge(layered, dict(quick)))


def distinct(values: Sequence[Any]) -> Sequence[Any]:
    """The rule of a study's lists (seeds, budgets, grid sizes, ...): non-empty, no value twice. For a pydantic
    field validator: the error names the repeated values and what is allowed."""
    if not values:
        raise PydanticCustomError("empty_list", "must be non-empty")
    twice: list[Any] = []
    for i, v in enumerate(values):
        if v in values[:i] and v not in twice:
            twice.append(v)
    if twice:
        shown = ", ".join(map(repr, twice))
        raise PydanticCustomError("listed_twice", f"{shown} listed twice; allowed: distinct values")
    return values


def check_study_train(train: Any) -> Any:
    """A study's ``train`` block (``toys.ensemble.TrainConfig``): the study trains CD and Direct CD itself (the
    method of each student), so ``method`` / ``k`` / ``direct_first_steps`` keep their defaults instead of
    being silently replaced. For a pydantic field validator."""
    given = {k: getattr(train, k) for k, default in (("method", "cd"), ("k", None), ("direct_first_steps", 0))
             if getattr(train, k) != default}
    if given:
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise PydanticCustomError("set_by_the_study", f"{shown}: the study sets the method of each student (CD and "
                                  "Direct CD); allowed: the defaults method 'cd', k null, direct_first_steps 0")
    return train


def apply_run_flags(cfg: M, args: argparse.Namespace) -> M:
    """``cfg`` with the command line's ``--threads`` (when given) and ``--no-progress`` applied to the
    config fields of those names that the study has."""
    fields = type(cfg).model_fields
    updates: dict[str, Any] = {}
    if getattr(args, "threads", None) is not None and "threads" in fields:
        updates["threads"] = args.threads
    if not getattr(args, "progress", True) and "progress" in fields:
        updates["progress"] = False
    return cfg.model_copy(update=updates) if updates else cfg


def results_folder(study: str, args: argparse.Namespace | None = None, out: str | Path | None = None,
                   create: bool = True, quick: bool | None = None) -> Path:
    """``--out`` if given, else ``<results>/<study>/<YYYYmmdd-HHMMSS>[-quick]`` (never reused; ``-quick``
    when ``quick``, default ``args.quick``).

    An ``--out`` folder that already holds files is refused (``InputError``) unless ``--overwrite``,
    which clears it first; an empty ``--out=`` is refused too. ``create=False`` only checks."""
    out = out if out is not None else (getattr(args, "out", None) if args is not None else None)
    if out is not None:
        if str(out).strip() == "":
            raise InputError("--out: empty path; give a folder (default: results/<study>/<timestamp>)")
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise InputError(f"--out: {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()):
            if not getattr(args, "overwrite", False):
                raise InputError(f"--out: {path} already holds results; choose a new folder or pass --overwrite")
            if create:
                shutil.rmtree(path)
    else:
        root = Path(getattr(args, "results", "results") if args is not None else "results")
        quick = getattr(args, "quick", False) if quick is None else quick
        stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
        path = root / study / stamp
        i = 1
        while path.exists():
            path = root / study / f"{stamp}~{i}"
            i += 1
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Any) -> Path:
    """JSON with tensors / numpy scalars / pydantic models converted (non-finite floats -> null)."""
    path = Path(path)
    path.write_text(json.dumps(_clean(data), indent=2, default=_jsonable))
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_config(folder: str | Path, config: BaseModel, argv: Sequence[str] | None = None, **extra: Any) -> Path:
    """``config.json``: the fully resolved config (a valid ``--config``: replaying it gives the same
    numbers) plus a ``_provenance`` block that loading ignores: git commit and dirty flag, package
    versions, the command line, torch threads and ``extra`` (e.g. ``quick``)."""
    data = {**config.model_dump(mode="json"),
            "_provenance": {**provenance(argv), "threads": torch.get_num_threads(), **extra}}
    return write_json(Path(folder) / "config.json", data)


def open_output(out_dir: str | Path | None, config: BaseModel, argv: Sequence[str] | None = None,
                **extra: Any) -> Path | None:
    """The results folder of a study's ``run(cfg, out_dir)``: None writes nothing (the Python API);
    otherwise the folder is created (parents too) and gets ``config.json``. A folder already holding
    ``metrics.json`` or ``config.json`` is refused (``InputError``) before anything is computed."""
    if out_dir is None:
        return None
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"out_dir: {path} exists and is not a folder")
    if path.is_dir() and any((path / f).exists() for f in ("metrics.json", "config.json")):
        raise InputError(f"out_dir: {path} already holds results; choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, config, argv=argv, **extra)
    return path


def write_table(folder: str | Path, table: str, name: str = "table.md", echo: bool = True) -> Path:
    path = Path(folder) / name
    path.write_text(table.rstrip() + "\n")
    if echo:
        print(table)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; cells are formatted with ``fmt`` unless already strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |")
    return "\n".join(lines)


# --- statistics over seeds ----------------------------------------------------------------------

def stat(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "std", "values"}`` of per-seed values (std with ddof = 1; 0 for one value)."""
    v = [float(x) for x in values]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "values": []}
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "std": s, "values": v}


def fmt(x: Any, digits: int = 3) -> str:
    """3 significant digits; scientific notation outside [1e-3, 1e4)."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 0)}e}"


def fmt_stat(s: dict[str, Any] | None) -> str:
    """``mean ± std`` (just the mean for a single value)."""
    if not s:
        return "-"
    if len(s.get("values", [])) > 1:
        return f"{fmt(s['mean'])} ± {fmt(s['std'], 2)}"
    return fmt(s["mean"])


# --- randomness and resources ---------------------------------------------------------------------

def seeded(seed: int) -> torch.Generator:
    """Seed torch's, Python's and NumPy's global RNGs with ``seed``; return ``Generator(seed)`` for
    code that takes explicit generators (the convention in odecm / toys)."""
    torch.manual_seed(int(seed))
    random.seed(int(seed))
    np.random.seed(int(seed) % (2**32))
    return torch.Generator().manual_seed(int(seed))


def set_threads(n: int | None) -> None:
    """Torch intra-op threads. The toy studies use tiny tensors on shared 2-core machines, where
    1 thread is fastest (thread wake-ups cost more than they save)."""
    if n:
        torch.set_num_threads(int(n))
        os.environ.setdefault("OMP_NUM_THREADS", str(int(n)))


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
