"""Per-caption bookkeeping of SDXL evaluation folders (teacher references, student samples): latent shards,
completeness by caption index, and the input key that a folder must match.

A shard file ``shards/<first>-<last>.safetensors`` holds ``{"latents": (n, C, h, w) float32, "indices": (n,)
int64}`` and is written atomically after its PNGs ``images/<i>.png``: it marks those captions done. A caption
is done when a shard holds it (and, with decoding, its PNG exists); a caption held by two shards makes the
folder corrupt. ``plan_shards`` lays the missing captions on the grid of the *current* ``shard_size``, so a
resume with another shard size computes exactly the missing captions.

Several processes may write one folder at once (two runs of the same command on one cache): every write
goes to a temporary name of its own (``odecm.atomic``) and is renamed into place, so no process can publish
another's half-written file. A shard that cannot be read (truncated by an older writer, a disk error) is
not done: ``done_indices`` warns and, with ``drop_incomplete``, deletes it, so its captions are computed
again.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from odecm.atomic import atomic_path, remove_stale_temps, write_json_atomic
from .eval_config import input_error, key_differences

Tensor = torch.Tensor

__all__ = ["shard_path", "write_latent_shard", "shard_files", "image_path", "done_indices", "missing_indices",
           "plan_shards", "read_latents", "folder_key_check", "write_manifest"]


def shard_path(folder: str | Path, indices: Sequence[int]) -> Path:
    """``<folder>/shards/<first>-<last>.safetensors`` (unique: a new shard always starts at a caption not yet done)."""
    return Path(folder) / "shards" / f"{min(indices):05d}-{max(indices):05d}.safetensors"


def write_latent_shard(path: str | Path, latents: Tensor, indices: Sequence[int]) -> None:
    """Atomically write ``{"latents", "indices"}`` (the shard's completion marker)."""
    from safetensors.torch import save_file

    tensors = {"latents": latents.detach().float().cpu().contiguous(),
               "indices": torch.as_tensor(list(indices), dtype=torch.int64)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def shard_files(folder: str | Path) -> list[Path]:
    return sorted((Path(folder) / "shards").glob("*.safetensors"))


def _shard_indices(path: Path) -> list[int] | None:
    """The caption indices a shard holds, or None (with a warning) when the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return fh.get_tensor("indices").tolist()
    except FileNotFoundError:  # deleted by another process meanwhile
        return None
    except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError, a missing key: all mean "not done"
        warnings.warn(f"{path}: unreadable latent shard ({type(err).__name__}: {str(err)[:120]}); "
                      f"its captions count as not done and are computed again", stacklevel=3)
        return None


def image_path(folder: str | Path, i: int) -> Path:
    return Path(folder) / "images" / f"{i:05d}.png"


def done_indices(folder: str | Path, decode: bool = True, drop_incomplete: bool = False) -> set[int]:
    """Caption indices with a finished latent (and, with ``decode``, its PNG) in ``folder/shards``.

    A caption held by two shard files is an error (a corrupt cache). An unreadable shard file is not done
    (a warning). With ``drop_incomplete`` (one process only) a shard that is unreadable or whose PNGs are
    not all present is deleted, and temporary files of dead writers are removed."""
    seen: dict[int, Path] = {}
    if drop_incomplete:
        for sub in ("shards", "images", "."):
            remove_stale_temps(Path(folder) / sub)
    for f in shard_files(folder):
        idx = _shard_indices(f)
        if idx is None or (decode and not all(image_path(folder, i).is_file() for i in idx)):
            if drop_incomplete:
                f.unlink(missing_ok=True)
            continue
        for i in idx:
            if i in seen:
                raise ValueError(f"{folder}: caption {i} is in two shards ({seen[i].name}, {f.name}); the folder is "
                                 f"corrupt: delete it and rerun")
            seen[i] = f
    return set(seen)


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, idx = [], sorted(indices)
    start = prev = None
    for i in idx + [None]:
        if start is not None and (i is None or i != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(out)


def missing_indices(folder: str | Path, n: int, decode: bool = True) -> list[int]:
    return sorted(set(range(n)) - done_indices(folder, decode))


def plan_shards(n: int, shard_size: int, done: set[int]) -> list[list[int]]:
    """The captions not in ``done``, in cells ``[s, s + shard_size)`` of the shard grid (empty cells dropped)."""
    cells = [[i for i in range(s, min(n, s + shard_size)) if i not in done] for s in range(0, n, shard_size)]
    return [c for c in cells if c]


def read_latents(folder: str | Path, n: int | None = None) -> tuple[Tensor, Tensor]:
    """All shards of ``folder/shards`` -> ``(indices, latents)`` sorted by caption index. A caption present
    twice is an error; with ``n``, so is any caption of ``0..n-1`` that is missing (an unreadable shard is
    skipped with a warning: its captions are missing)."""
    from safetensors.torch import load_file

    files = [f for f in shard_files(folder) if _shard_indices(f) is not None]
    if not files:
        raise FileNotFoundError(f"no readable latent shards in {Path(folder) / 'shards'}")
    parts = [load_file(str(f)) for f in files]
    idx = torch.cat([p["indices"] for p in parts])
    lat = torch.cat([p["latents"] for p in parts])
    order = torch.argsort(idx)
    idx, lat = idx[order], lat[order]
    if len(idx) > 1 and bool((idx[1:] == idx[:-1]).any()):
        dup = sorted(set(idx[1:][idx[1:] == idx[:-1]].tolist()))
        raise ValueError(f"{folder}: captions {_ranges(dup)} are in two shards; the folder is corrupt")
    if n is not None and idx.tolist() != list(range(n)):
        miss = sorted(set(range(n)) - set(idx.tolist()))
        raise ValueError(f"{folder}: incomplete, captions {_ranges(miss)} of 0-{n - 1} are missing; rerun the command "
                         f"that wrote it (it resumes)")
    return idx, lat



# ------------------------------------------------------------------------------------------- folder key
def folder_key_check(key_name: str, folder: Path, kind: str, key: dict) -> None:
    """Refuse ``folder`` when its ``manifest.json`` holds a ``kind`` written from other inputs (``key``)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise input_error(f"{key_name}={folder}: exists and is not a {kind} folder (no manifest.json); "
                              f"allowed: a new folder or one this command wrote")
        return
    man = json.loads(manifest.read_text())
    if man.get("kind") != kind or "key" not in man:
        raise input_error(f"{key_name}={folder}: holds a {man.get('kind', 'unknown')!r} folder without a {kind} key; "
                          f"allowed: a new folder or one this command wrote")
    diff = key_differences(man["key"], key)
    if diff:
        raise input_error(f"{key_name}={folder}: holds a {kind} of other inputs ({'; '.join(diff)}); "
                          f"allowed: the same inputs, another {key_name}, or delete the folder")


def write_manifest(path: Path, manifest: dict) -> None:
    """Atomically write ``manifest.json`` (a temporary name of this process's own, then a rename)."""
    write_json_atomic(path, manifest)
