"""Run folders that never mix, and resumes that refuse config changes.

Run-folder policy (``prepare_run_dir(out_dir, resume, overwrite)``, called before anything heavy):

* an empty or missing ``out_dir`` is an error: a run never writes into the current directory;
* a fresh run (no ``resume``) needs a missing or empty ``out_dir``; a non-empty one is an error
  unless ``overwrite=True``, which deletes its contents first (never the current directory, one of
  its parents, the home folder or ``/``);
* ``resume="latest"`` needs a run in ``out_dir`` with a published checkpoint; ``resume=<folder>``
  needs a complete checkpoint inside ``<out_dir>/checkpoints`` (a checkpoint continues its own run);
* ``resume`` together with ``overwrite`` is an error.

Resume policy: every checkpoint stores the run's fully resolved config (a JSON dict). On resume,
``diff_configs(old, new)`` lists every differing leaf as ``(dotted key, old, new)`` and
``check_resume_config(old, new, policy, allow_change)`` sorts the differences by the longest
matching dotted-key prefix of a ``ResumePolicy``:

* under a ``refuse`` prefix: refused, unless a prefix in ``allow_change`` (named by the user)
  covers the key, in which case it is allowed with a note;
* under a ``note`` prefix: allowed with a note, if its ``conditions`` entry (``(predicate(old, new),
  "may only grow")``) holds, refused otherwise;
* under neither: ``policy.default`` ("refuse" or "note").

Every refused difference is listed in one ``ConfigChangeError``; otherwise the notes are returned
for the caller to log. A backend defines its own policy (e.g. SDXL refuses changes of the method,
solver, grid, seed, model, student, data and optimizer, and notes larger ``train_steps``).

odecm's cache folder (``cache_root()``), the one place every cached artefact lives under (the tiny SDXL
model, content digests of weight files, learned toy teachers, the image world's models):
``$ODECM_CACHE_DIR``, else ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from .checkpoint import (CHECKPOINTS, CheckpointError, NoCheckpointError, checkpoint_step, latest_checkpoint,
                         list_checkpoints, read_meta)
from .config import ConfigError

__all__ = [
    "RunDirError",
    "ConfigChangeError",
    "MISSING",
    "new_run_id",
    "prepare_run_dir",
    "resolve_resume",
    "diff_configs",
    "ResumePolicy",
    "check_resume_config",
    "grows",
    "cache_root",
]


class RunDirError(ConfigError):
    """An ``out_dir`` / ``resume`` / ``overwrite`` combination that would mix runs or lose data."""


class ConfigChangeError(ConfigError):
    """Resume with a config that differs from the checkpoint's in keys the policy refuses."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: the value ``diff_configs`` reports for a key present on one side only
MISSING = _Missing()


def new_run_id() -> str:
    """A fresh run identifier (32 hex digits), kept by every checkpoint and resume of the run."""
    return uuid.uuid4().hex


def cache_root() -> Path:
    """odecm's cache folder: ``$ODECM_CACHE_DIR``, else ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``
    (read at each call, so a test or a launcher may point it elsewhere; nothing is created here)."""
    if os.environ.get("ODECM_CACHE_DIR"):
        return Path(os.environ["ODECM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "odecm"


# ---------------------------------------------------------------------------------- run folders
def _protected(path: Path) -> str | None:
    here = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == here or path in here.parents:
        return "the current directory or one of its parents"
    if path == Path.home().resolve():
        return "the home folder"
    return None


def resolve_resume(out_dir: str | Path, resume: str | Path) -> Path:
    """The checkpoint folder ``resume`` names in the run ``out_dir`` (``"latest"`` or a folder of
    ``<out_dir>/checkpoints``); a clear ``CheckpointError`` when there is none."""
    out = Path(out_dir)
    if str(resume) == "latest":
        path = latest_checkpoint(out)
        if path is None:
            where = out / CHECKPOINTS
            why = "it does not exist" if not out.exists() else f"{where} has no 'latest' checkpoint"
            raise NoCheckpointError(f"resume='latest': nothing to resume in out_dir={str(out)!r} ({why}); "
                                    "start a fresh run without resume")
        return path
    path = Path(resume)
    run_id = read_meta(path)["run_id"]  # complete, odecm format, not the old pickle format
    if path.resolve().parent != (out / CHECKPOINTS).resolve():
        raise CheckpointError(f"resume={str(resume)!r} is not a checkpoint of out_dir={str(out)!r} (expected a folder "
                              f"in {out / CHECKPOINTS}); a checkpoint continues its own run: resume in its run "
                              "folder, or copy the checkpoint into <out_dir>/checkpoints")
    step = checkpoint_step(path)
    newer = [p.name for s, p in list_checkpoints(out / CHECKPOINTS, run_id) if step is not None and s > step]
    if newer:
        raise CheckpointError(f"resume={str(resume)!r} is older than this run's checkpoints {newer}; resuming it "
                              "would rewrite them: delete them first, or resume='latest'")
    return path


def prepare_run_dir(out_dir: str | Path | None, resume: str | Path | None = None, overwrite: bool = False,
                    is_main: bool = True) -> Path:
    """Check (and on the main process create or clear) a run folder; returns it.

    ``is_main=False`` only checks (call it on every process, then let the main one act, e.g.
    ``prepare_run_dir(out, resume, overwrite, is_main=acc.is_main_process); acc.wait_for_everyone()``).
    """
    if out_dir is None or not str(out_dir).strip():
        raise RunDirError("out_dir: empty; name a folder for this run (a run never writes into the current directory)")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir={str(out)!r} is a file, not a folder")
    if resume not in (None, "", False):
        if overwrite:
            raise RunDirError(f"resume={str(resume)!r} and overwrite=true contradict each other: "
                              "resume continues the run in out_dir, overwrite deletes it")
        resolve_resume(out, resume)
        return out
    reason = _protected(out.resolve())
    if reason is not None:
        raise RunDirError(f"out_dir={str(out_dir)!r} is {reason}; name a folder of its own for this run")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        hint = " (it holds a run: pass resume='latest' to continue it)" if (out / CHECKPOINTS).exists() else ""
        raise RunDirError(f"out_dir={str(out)!r} is not empty{hint}: {entries[:5]}{' ...' if len(entries) > 5 else ''}; "
                          "use a new folder, or overwrite=true to delete its contents first")
    if is_main:
        if entries:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------- configs
def _normal(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, as stored in a checkpoint."""
    return json.loads(json.dumps(value))


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every differing leaf as ``(dotted key, old value, new value)``, sorted by key; nested dicts
    are walked, lists compared whole; a key on one side only has ``MISSING`` on the other."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, MISSING), b.get(k, MISSING), f"{prefix}.{k}" if prefix else str(k))
        elif a is MISSING or b is MISSING or a != b or (type(a) is bool) != (type(b) is bool):
            out.append((prefix, a, b))

    walk(_normal(dict(old)), _normal(dict(new)), "")
    return out


def grows(old: Any, new: Any) -> bool:
    """Condition for keys that may only increase (e.g. the number of training steps)."""
    return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new >= old


@dataclass(frozen=True)
class ResumePolicy:
    """Which config differences a resume accepts (dotted-key prefixes; the longest match decides).

    ``refuse``: refused unless named in ``allow_change``; ``note``: allowed and logged, subject to
    ``conditions[prefix] = (predicate(old, new) -> bool, "what is allowed")``; anything else
    follows ``default``."""

    refuse: tuple[str, ...] = ()
    note: tuple[str, ...] = ()
    conditions: Mapping[str, tuple[Callable[[Any, Any], bool], str]] = field(default_factory=dict)
    default: Literal["refuse", "note"] = "refuse"

    def rule(self, key: str) -> str:
        best, kind = -1, self.default
        for kind_, prefixes in (("refuse", self.refuse), ("note", self.note)):
            for p in prefixes:
                if _covers(p, key) and len(p) > best:
                    best, kind = len(p), kind_
        return kind

    def condition(self, key: str) -> tuple[Callable[[Any, Any], bool], str] | None:
        matches = [p for p in self.conditions if _covers(p, key)]
        return self.conditions[max(matches, key=len)] if matches else None


def _covers(prefix: str, key: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def check_resume_config(old: Mapping[str, Any], new: Mapping[str, Any], policy: ResumePolicy,
                        allow_change: Sequence[str] = (), what: str = "config") -> list[str]:
    """Raise ``ConfigChangeError`` listing every difference ``policy`` refuses; return one note per
    accepted difference (``"<key>: <old> -> <new>"``) for the caller to log."""
    notes, refused = [], []
    for key, a, b in diff_configs(old, new):
        line = f"{key}: {a!r} -> {b!r}"
        kind = policy.rule(key)
        if kind == "note":
            cond = policy.condition(key)
            if cond is not None and not cond[0](a, b):
                refused.append(f"{line} ({cond[1]})")
            else:
                notes.append(line)
        elif any(_covers(p, key) for p in allow_change):
            notes.append(f"{line} (allowed by allow_change)")
        else:
            refused.append(line)
    if refused:
        raise ConfigChangeError(
            f"resume refused: the {what} differs from the checkpoint's in keys this run may not change:\n  "
            + "\n  ".join(refused)
            + "\nStart a new run in a new out_dir, or name the keys in allow_change if the change is intended.")
    return notes
