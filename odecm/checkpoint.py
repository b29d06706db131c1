"""Checkpoint folders on disk: tensors in safetensors, everything else in JSON; nothing is pickled.

Layout of ``<out_dir>/checkpoints/``::

    latest                    text file naming the newest *published* checkpoint folder
    step_0000040/             a published checkpoint (its weights were seen to give a finite loss)
        student.safetensors   the student's stored tensors (``Trainer.student_state``)
        target.safetensors    the EMA target's tensors (EMA targets only)
        state.safetensors     every other tensor of the loop's state (optimizer moments, 8-bit
                              quantisation maps, RNG byte states), keyed by its path in ``state``
        state.json            format + version, step, run id, whole-run totals, the run's resolved
                              config, the loop settings, and ``state``: the optimizer / lr scheduler /
                              grad scaler / RNG states with each tensor replaced by a reference
        COMPLETE              written last; a folder without it is not a checkpoint
    .pending_step_0000042/    written but not yet verified (deleted at the next start)
    .tmp_*                    a write in progress (deleted at the next start)

Nested states are encoded to JSON by ``encode_state``: a tensor becomes ``{"__tensor__": key}``
(the tensor goes to ``state.safetensors`` under ``key``), a tuple ``{"__tuple__": [...]}``, a dict
with non-string keys ``{"__dict__": [[key, value], ...]}``, a NumPy array ``{"__ndarray__": [...],
"dtype": ...}`` and a non-finite float ``{"__float__": "nan" | "inf" | "-inf"}``; ``decode_state``
inverts it exactly (Python floats survive JSON bit for bit). Loading therefore runs no pickle.
A folder holding ``state.pt`` (the pickle format of earlier odecm versions) is refused with
``LegacyCheckpointError``, without opening the file.

Publishing (``publish``) renames ``.pending_step_K`` to ``step_K``, points ``latest`` at it
(atomic ``os.replace``), then prunes: of the checkpoints whose ``run_id`` is this run's, the
newest ``keep`` by step number stay, and the one ``latest`` names is never deleted.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "LegacyCheckpointError",
    "NoCheckpointError",
    "encode_state",
    "decode_state",
    "save_tensors",
    "load_tensors_into",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
    "read_meta",
    "read_state",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "publish",
    "prune",
    "remove_orphans",
]

FORMAT = "odecm-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
PENDING_PREFIX = ".pending_"
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__float__")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, incomplete, of another format, or of another run."""


class LegacyCheckpointError(CheckpointError):
    """The folder holds the old pickle format (``state.pt``), which is never unpickled."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """``resume="latest"`` in a run folder that has no published checkpoint."""


# ---------------------------------------------------------------------------------- encoding
def encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "state") -> Any:
    """JSON-able copy of ``obj``; each tensor is moved into ``tensors[path]`` (a CPU clone)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, path)
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: encode_state(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__dict__": [[encode_state(k, tensors, f"{path}/<key>"), encode_state(v, tensors, f"{path}/{k}")]
                             for k, v in obj.items()]}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored in a checkpoint without pickle; "
                    "allowed: tensors, numbers, strings, None, NumPy arrays and lists / tuples / dicts of them")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"state.json refers to tensor {value!r}, missing from state.safetensors")
            return tensors[value]
        if key == "__tuple__":
            return tuple(decode_state(v, tensors) for v in value)
        if key == "__dict__":
            return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in value}
        if key == "__float__":
            return float(value)
    if set(obj) == {"__ndarray__", "dtype"}:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file of contiguous CPU clones (shared storage is not allowed by the format)."""
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors_into(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a (possibly partial, e.g. LoRA-only) state dict; unknown keys are an error."""
    result = module.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"checkpoint has keys the module lacks: {result.unexpected_keys[:5]} ...")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state a run draws from: torch CPU / CUDA, ``generator``, Python, NumPy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------------- folders
def _check_folder(path: Path) -> None:
    if (path / "state.pt").exists() and not (path / "state.json").exists():
        raise LegacyCheckpointError(
            f"resume: {path} is a checkpoint in the old pickle format (state.pt) of earlier odecm versions; "
            "it is not loaded, since unpickling a file can run arbitrary code. Start a new run "
            "(its student.safetensors weights can still be read with safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"resume: {path} is not a checkpoint folder (it does not exist)")
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"resume: {path} is not a complete checkpoint (no COMPLETE marker)")
    if not (path / "state.json").exists():
        raise CheckpointError(f"resume: {path} has no state.json; it is not an odecm checkpoint")


def write_checkpoint(folder: Path, meta: dict[str, Any], state: dict[str, Any],
                     weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write a checkpoint into the (new, empty) ``folder``: ``weights[name]`` -> ``name.safetensors``,
    tensors of ``state`` -> ``state.safetensors``, ``meta`` + encoded ``state`` -> ``state.json``,
    then ``COMPLETE``. The caller writes into a temporary folder and renames it."""
    for name, tensors in weights.items():
        save_tensors(tensors, folder / f"{name}.safetensors")
    state_tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, state_tensors)
    save_file(state_tensors, str(folder / "state.safetensors"))
    doc = {"format": FORMAT, "version": FORMAT_VERSION, **meta, "state": encoded}
    (folder / "state.json").write_text(json.dumps(doc, allow_nan=False))
    (folder / "COMPLETE").write_text(str(meta.get("step", "")))


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint without its tensors (step, run_id, totals, config, ...)."""
    folder = Path(folder)
    _check_folder(folder)
    doc = json.loads((folder / "state.json").read_text())
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"resume: {folder} has format {doc.get('format')!r} version {doc.get('version')!r}; "
                              f"this odecm reads {FORMAT!r} version {FORMAT_VERSION}")
    return doc


def read_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(meta, decoded state, weights) of a checkpoint: ``weights`` maps ``student`` / ``target`` to
    their tensors. Reads safetensors and JSON only."""
    folder = Path(folder)
    meta = read_meta(folder)
    state = decode_state(meta.pop("state"), load_file(str(folder / "state.safetensors")))
    weights = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors") if p.stem != "state"}
    return meta, state, weights


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_XXXXXXX`` folder name (None for other names)."""
    name = Path(path).name
    if not name.startswith("step_"):
        return None
    try:
        return int(name[len("step_"):])
    except ValueError:
        return None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint folder named by ``<out_dir>/checkpoints/latest``; None when there is no pointer.
    A pointer naming a missing or incomplete folder is an error (it never silently means "none")."""
    ckdir = Path(out_dir) / CHECKPOINTS
    pointer = ckdir / LATEST
    if not pointer.exists():
        return None
    path = ckdir / pointer.read_text().strip()
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"resume: {pointer} names {path.name}, which is missing or incomplete; "
                              f"complete checkpoints there: {[p.name for _, p in list_checkpoints(ckdir)]}")
    return path


def list_checkpoints(ckdir: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """Published checkpoints in ``ckdir`` as (step, folder), oldest first; only ``run_id``'s if given."""
    found = []
    for p in Path(ckdir).glob("step_*"):
        step = checkpoint_step(p)
        if step is None or not (p / "COMPLETE").exists():
            continue
        if run_id is not None:
            try:
                if json.loads((p / "state.json").read_text()).get("run_id") != run_id:
                    continue
            except (OSError, ValueError):
                continue
        found.append((step, p))
    return sorted(found)


def _write_pointer(ckdir: Path, name: str) -> None:
    tmp = ckdir / f".tmp_latest_{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, ckdir / LATEST)


def publish(pending: Path, keep: int, run_id: str) -> Path:
    """Rename ``.pending_step_K`` to ``step_K``, point ``latest`` at it, prune; returns the new folder."""
    ckdir = pending.parent
    final = ckdir / pending.name[len(PENDING_PREFIX):]
    if final.exists():  # an earlier write of the same step (never the one ``latest`` names: that is older)
        stale = ckdir / f".tmp_replaced_{final.name}_{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(pending, final)
    _write_pointer(ckdir, final.name)
    prune(ckdir, keep, run_id)
    return final


def prune(ckdir: Path, keep: int, run_id: str) -> list[Path]:
    """Delete this run's published checkpoints beyond the newest ``keep`` (by step); never the one
    ``latest`` names, never another run's. Returns the deleted folders."""
    latest = (ckdir / LATEST).read_text().strip() if (ckdir / LATEST).exists() else None
    mine = list_checkpoints(ckdir, run_id)
    doomed = [p for _, p in mine[: max(0, len(mine) - keep)] if p.name != latest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_orphans(ckdir: Path) -> list[Path]:
    """Delete what killed writes left behind: ``.tmp_*`` folders / files and unverified ``.pending_*``."""
    removed = []
    for p in sorted(Path(ckdir).glob(".tmp_*")) + sorted(Path(ckdir).glob(f"{PENDING_PREFIX}*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed

