"""Atomic writes that concurrent processes cannot mix up: a private temporary name, then ``os.replace``.

Used by every cache and run folder (SDXL references, samples, latent and feature caches, LoRA folders,
the toys' learned teachers and the image world's models).

Every writer gets its own temporary name next to the target, ``<name>.<host>-<pid>-<8 random hex>.tmp``
(``temp_path``), so two processes writing the same file never write into, or rename, each other's
half-written file; the rename is atomic on one filesystem, so a reader sees the old file or the complete
new one, and a ``kill -9`` leaves at most a ``*.tmp`` file that no reader looks at. ``remove_stale_temps``
deletes the leftovers of dead processes of this host (a live writer's temporary file is never touched).

``atomic_folder`` does the same for a folder (a LoRA or student folder): it is filled under a temporary
name and renamed into place; an existing folder is first moved aside, then deleted.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["temp_path", "atomic_path", "write_text_atomic", "write_json_atomic", "atomic_folder",
           "remove_stale_temps", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
_TEMP = re.compile(r"\.(?P<host>\w+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def temp_path(path: str | Path, hidden: bool = False) -> Path:
    """A temporary name next to ``path`` that no other process (or call) uses:
    ``<name>.<host>-<pid>-<random>.tmp`` (with a leading dot when ``hidden``)."""
    path = Path(path)
    name = f"{'.' if hidden else ''}{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    return path.with_name(name)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)`` -> ``tmp`` renamed to ``p`` when the block succeeds
    (and deleted when it raises). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(p) as tmp: fill(tmp)`` -> the folder ``tmp`` renamed to ``p`` when the block
    succeeds. An existing ``p`` is renamed aside first and deleted after the new one is in place, so a
    kill leaves ``p`` either absent, the old folder or the new, complete one (never a mix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path, hidden=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = temp_path(path, hidden=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders (``temp_path`` names) in ``folder`` left by processes of this
    host that are no longer running; returns what was removed. Another host's or a live process's
    temporary file is left alone."""
    folder, host, removed = Path(folder), _host(), []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.search(p.name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:  # removed by someone else meanwhile
            pass
    return removed
