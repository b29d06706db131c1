"""Process control of the kill/resume benchmark: start a worker, kill it with SIGKILL, read what it left.

A *worker* is a top-level function ``module:function`` called with JSON-able keyword arguments. It runs
in a child process, started one of two ways:

* ``fork`` (default): ``os.fork()`` of the benchmark process, which has already imported torch,
  diffusers, transformers and peft (``warm_imports``) but never ran a multi-threaded torch op, so a
  worker starts in milliseconds instead of the 10-45 s an import costs on a loaded 2-core machine;
* ``spawn``: a fresh ``python -m benchmarks.kill_resume_runner --child module:function JSON``.

Either way the child is killed with ``SIGKILL`` (``kill -9``): no handler, ``finally`` block or
``atexit`` hook runs, so what is on disk afterwards is exactly what an out-of-memory kill or a power
cut of the process leaves. Workers run torch on one thread (bitwise-reproducible CPU arithmetic).

Kill moments (``kill_moment``): ``random`` sleeps a uniformly drawn time in [0, ``window``] after the
start (``window`` = the uninterrupted run's duration); ``write`` polls the output folder and kills at
the first sight of a write in progress (a ``.tmp`` file or folder), the most dangerous moment.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["Child", "warm_imports", "start", "kill_all", "kill_moment", "finish", "read_tensors", "max_abs_diff",
           "fresh_entries", "REPO"]

REPO = Path(__file__).resolve().parent.parent
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
              "TRANSFORMERS_VERBOSITY": "error", "MPLBACKEND": "Agg"}


def warm_imports(sdxl: bool = True) -> float:
    """Import what the workers need (no torch op runs, so forking stays safe); returns the seconds taken."""
    os.environ.update(THREAD_ENV)
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401  (imported by the first optimizer built: seconds)
    import odecm.objectives  # noqa: F401
    import odecm.training  # noqa: F401
    import toys.gmm  # noqa: F401
    import toys.networks  # noqa: F401
    if sdxl:
        import accelerate  # noqa: F401
        import peft  # noqa: F401
        from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler,  # noqa: F401
                               StableDiffusionXLPipeline, UNet2DConditionModel)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

        import sdxl.latent_cache  # noqa: F401
        import sdxl.reference  # noqa: F401
        import sdxl.train  # noqa: F401
    return time.perf_counter() - t0


_LIVE: dict[int, "Child"] = {}


def kill_all() -> int:
    """SIGKILL every child this process started that is still running (call in a ``finally``)."""
    n = 0
    for child in list(_LIVE.values()):
        n += int(child.kill())
    return n


@dataclass
class Child:
    """A running worker: ``pid``, its log file, start time; ``popen`` in spawn mode."""

    name: str
    pid: int
    log: Path
    started: float
    popen: subprocess.Popen | None = None
    returncode: int | None = None
    killed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def poll(self) -> int | None:
        """The exit status once the child has ended (reaped), else None."""
        if self.returncode is not None:
            return self.returncode
        if self.popen is not None:
            self.returncode = self.popen.poll()
            if self.returncode is not None:
                _LIVE.pop(self.pid, None)
            return self.returncode
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        _LIVE.pop(self.pid, None)
        return self.returncode

    def kill(self) -> bool:
        """SIGKILL (kill -9) and reap; False if the child had already ended."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        finish(self)
        return True

    def log_tail(self, lines: int = 6) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""


def _call(spec: str, kwargs: dict[str, Any]) -> int:
    """Run ``module:function(**kwargs)``; the exit status: 0, a SystemExit code, or 1 on an exception."""
    module, name = spec.split(":")
    try:
        import torch

        torch.set_num_threads(1)
        getattr(importlib.import_module(module), name)(**kwargs)
        return 0
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 -- reported in the log, returned as status 1
        traceback.print_exc()
        return 1


def _fork_safe() -> bool:
    """Stop the helper threads a fork must not inherit (tqdm's monitor thread, which holds tqdm's lock
    now and then: a child forked at that moment hangs at its first progress bar); True when only the
    main thread is left."""
    import threading

    try:
        from tqdm import std

        classes, stack = [], [std.tqdm]
        while stack:
            cls = stack.pop()
            classes.append(cls)
            stack += cls.__subclasses__()
        std.tqdm.monitor_interval = 0
        for cls in classes:
            monitor = cls.__dict__.get("monitor")
            if monitor is not None:
                monitor.exit()
                cls.monitor = None
    except ImportError:
        pass
    return all(t is threading.main_thread() or not t.is_alive() for t in threading.enumerate())


def start(name: str, spec: str, kwargs: dict[str, Any], log: Path, spawn: bool | None = False) -> Child:
    """Start worker ``spec`` (``module:function``) with ``kwargs``; stdout and stderr go to ``log``.
    ``spawn=None``: fork when this process has no other thread left (``_fork_safe``), else spawn."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if not spawn and not _fork_safe():
        import threading

        names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if spawn is False:
            raise RuntimeError(f"cannot fork safely: this process runs other threads {names}; use spawn")
        print(f"[kill_resume] other threads {names} are running: starting {name} as a fresh process", flush=True)
        spawn = True
    if spawn:
        env = {**os.environ, **THREAD_ENV, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(log, "ab") as fh:
            popen = subprocess.Popen([sys.executable, "-m", "benchmarks.kill_resume_runner", "--child", spec,
                                      json.dumps(kwargs)], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        child = Child(name, popen.pid, log, time.perf_counter(), popen)
        _LIVE[child.pid] = child
        return child
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # Python-level streams too (under pytest they are capture objects, not fds 1 and 2)
            sys.stdout = sys.stderr = open(log, "a", buffering=1, encoding="utf-8", errors="replace")
            code = _call(spec, kwargs)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    child = Child(name, pid, log, time.perf_counter())
    _LIVE[pid] = child
    return child


def finish(child: Child, timeout: float | None = 900.0) -> int:
    """Wait for the child to end (SIGKILL after ``timeout`` seconds: a hung worker never blocks the
    benchmark); its exit status (-9: killed)."""
    deadline = None if timeout is None else time.perf_counter() + timeout
    while child.poll() is None:
        if deadline is not None and time.perf_counter() > deadline:
            os.kill(child.pid, signal.SIGKILL)
            child.killed = True
            deadline = None
        time.sleep(0.01)
    return child.returncode


def fresh_entries(folder: Path | None, since: float, match: Callable[[str], bool]) -> list[str]:
    """Names in ``folder`` that ``match`` and were created or modified at or after ``since`` (``time.time()``):
    what the current worker left, not the leftovers of an earlier kill."""
    if folder is None:
        return []
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        try:
            if match(entry.name) and entry.stat(follow_symlinks=False).st_mtime >= since:
                found.append(entry.name)
        except OSError:  # renamed or deleted while listed
            continue
    return sorted(found)


def kill_moment(child: Child, mode: str, rng: np.random.Generator, window: float,
                writing: Callable[[], bool] | None = None, settle: Callable[[], bool] | None = None,
                timeout: float | None = None) -> str:
    """Kill ``child`` at a ``random`` moment (uniform in [0, ``window``] s after its start) or, in any
    other mode, as soon as the probe ``writing()`` is true (polled continuously; e.g. a write in
    progress). ``settle()`` (optional) must be true as well. Returns ``"killed"``, ``"finished"`` (the
    child ended on its own first) or ``"hung"`` (no probe fired within ``timeout`` s; killed)."""
    if mode == "random":
        deadline = child.started + float(rng.uniform(0.0, window))
        while time.perf_counter() < deadline:
            if child.poll() is not None:
                return "finished"
            time.sleep(min(0.005, max(0.0, deadline - time.perf_counter())))
        return "killed" if child.kill() else "finished"
    if writing is None:
        raise ValueError(f"kill mode {mode!r} needs a writing() probe (only 'random' runs without one)")
    polls, deadline = 0, None if timeout is None else child.started + timeout
    while child.poll() is None:
        if (settle is None or settle()) and writing():
            return "killed" if child.kill() else "finished"
        if deadline is not None and time.perf_counter() > deadline:
            return "hung" if child.kill() else "finished"
        polls += 1
        if polls % 64 == 0:
            time.sleep(0)  # yield; the probe itself is the wait
    return "finished"


# ------------------------------------------------------------------------------------------ reading
def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays (raises on a truncated or malformed file)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max |a - b| over every tensor (inf if the key sets or shapes differ; NaN compares equal to NaN)."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k in a:
        x, y = np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64)
        if x.shape != y.shape:
            return float("inf")
        d = np.abs(x - y)
        d[np.isnan(x) & np.isnan(y)] = 0.0
        if d.size:
            worst = max(worst, float(np.nanmax(np.where(np.isnan(d), np.inf, d))))
    return worst


def _child_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="run one kill/resume worker (spawn mode)")
    ap.add_argument("--child", required=True, metavar="MODULE:FUNCTION")
    ap.add_argument("kwargs", help="JSON keyword arguments")
    args = ap.parse_args(argv)
    raise SystemExit(_call(args.child, json.loads(args.kwargs)))


if __name__ == "__main__":
    _child_main()
