"""One command line for every entry point (``python -m sdxl.*``, ``python -m studies.*``, console scripts).

Flags every entry point shares (``add_config_args``):

* ``--config FILE``: a YAML or JSON config (for SDXL a bare name such as ``cd_ddim`` means a
  shipped config). The ``config.json`` that any run writes is itself a valid ``--config``: it holds
  the fully resolved config plus a ``_provenance`` block that loading ignores.
* ``--set KEY=VALUE [KEY=VALUE ...]``: dotted keys, YAML values (numbers, booleans, lists, null).
  Both forms work and append: ``--set a=1 b=2`` is the same as ``--set a=1 --set b=2``. Overrides are
  applied after the config file. **A key given twice** (or a key together with one of its sub-keys)
  **is an error** naming both overrides; nothing is silently dropped.
* ``--check``: validate and stop. The command line is parsed and the config resolved and validated as a
  real run does it, then the checks a real run makes *at the door* (before any model loads) run: the
  config models' validators; a study's ``resolve_config``, door checks and results-folder check (``--out``,
  ``--overwrite``); ``sdxl.checks.check_config`` (packages a config names, the batch split over
  ``launch_world_size()`` processes, model sources, the grid on the model's scheduler config, ``data.path``
  and its sample count, latent caches, precomputed targets); ``--resume`` against the run's checkpoint; the
  caption / reference / sample / weight-file checks of ``sdxl.reference``, ``sdxl.sample``,
  ``sdxl.evaluate``. Cheap checks that read files (``data.path`` lists images, a reference is complete)
  do run. Success prints one line, ``ok: <module> config valid (<n> keys)`` (``studies.report`` and
  ``studies.sdxl_table``, which take no config: ``ok: <module> inputs valid (...)``), exit status 0; a bad config
  fails as below. ``--check`` loads no model, trains nothing and creates, clears or writes no file or
  folder of the run (``sdxl.sample`` hashes the student's weights, which updates odecm's digest cache,
  as a real run does). It touches no network, with one exception that a real run's door check shares: online,
  ``sdxl.train`` / ``sdxl.precompute_targets`` fetch an uncached hub model's ``scheduler_config.json``
  (offline, a hub id must be in the local cache). It does not verify what only loading or running finds:
  that weight files are readable and fit the architecture, that an uncached hub id exists, that a device
  has the memory, and anything found later in the run (e.g. too many unreadable images).

Errors: a bad key or value (``odecm.config.ConfigError``, or an ``InputError`` raised by a check at the
door) is printed by ``run_main`` as one line per problem on stderr, ``error: <key>: <problem>``,
without a traceback, and the process exits with status 2 before any model loads or any folder is made.

``provenance()`` records what a run needs to be replayed: git commit and whether the tree was dirty,
the versions of python, torch, diffusers, transformers, peft and accelerate (read from the installed
package metadata: nothing is imported), the command line and the time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from pydantic import BaseModel

from .config import ConfigError, load_config

__all__ = [
    "InputError",
    "add_config_args",
    "add_check_arg",
    "report_check",
    "launch_world_size",
    "overrides_from",
    "config_from_args",
    "positive_int",
    "nonnegative_int",
    "run_main",
    "provenance",
    "PROVENANCE_PACKAGES",
]

M = TypeVar("M", bound=BaseModel)

#: packages whose versions ``provenance`` records
PROVENANCE_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "torchdiffeq", "odecm")


class InputError(ConfigError):
    """A bad input found by a check at the door (a path that does not exist, a folder that would be
    overwritten, ...). The message names the key or flag, the value and what is allowed."""


def add_config_args(parser: argparse.ArgumentParser, config_help: str | None = None) -> argparse.ArgumentParser:
    """Add ``--config``, ``--set`` and ``--check`` (see the module docstring) to ``parser``."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=config_help or "YAML / JSON config file (a run's config.json replays the run)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set distill.train_steps=10 seeds=[0,1]; repeatable; "
                             "a key given twice is an error")
    return add_check_arg(parser)


def add_check_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--check`` (validate the command line and config, run the door checks, exit; module docstring)."""
    parser.add_argument("--check", action="store_true",
                        help="validate the command line, the config and the inputs, print 'ok: ...' and exit 0; "
                             "loads no model and writes nothing")
    return parser


def _leaf_count(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_leaf_count(v) for v in value.values())
    return 1


def report_check(args: argparse.Namespace, module: str, config: BaseModel | None = None,
                 door: Callable[[], Any] | None = None, **inputs: Any) -> bool:
    """With ``--check``: run ``door()`` (the entry point's checks that a real run makes later, if any), print
    ``ok: <module> config valid (<n> keys)`` (``n`` leaf keys of the resolved ``config``; without a config
    ``ok: <module> inputs valid (k=v, ...)``) and return True, so that the entry point returns before any
    model loads; without ``--check`` return False (``door`` is not called). A failing check raises as in a
    real run. Use: ``if report_check(args, "sdxl.train", cfg, door=lambda: door_checks(cfg)): return None``."""
    if not getattr(args, "check", False):
        return False
    if door is not None:
        door()
    if config is not None:
        print(f"ok: {module} config valid ({_leaf_count(config.model_dump(mode='json'))} keys)")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in inputs.items())
        print(f"ok: {module} inputs valid" + (f" ({shown})" if shown else ""))
    return True


def launch_world_size() -> int:
    """The number of processes a launcher (``accelerate launch``, ``torchrun``) started: ``$WORLD_SIZE``, else 1.
    What ``--check`` uses where a real run asks its ``Accelerator``."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def overrides_from(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides in command-line order."""
    return list(getattr(args, "overrides", None) or [])


def config_from_args(model: type[M], args: argparse.Namespace, base: dict[str, Any] | None = None,
                     resolve_path: Callable[[str], str | Path] | None = None) -> M:
    """Validate ``base`` <- ``--config`` file <- ``--set`` overrides as ``model`` (errors: ConfigError).
    ``resolve_path`` maps the ``--config`` value to a file (e.g. shipped config names)."""
    path = getattr(args, "config", None)
    if path is not None and resolve_path is not None:
        path = resolve_path(path)
    return load_config(model, path, overrides_from(args), base=base)


def _bounded_int(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: {what}")
        return value
    parse.__name__ = what
    return parse


#: argparse ``type=`` for flags such as ``--threads`` (an integer >= 1)
positive_int = _bounded_int(1, "an integer >= 1")
#: argparse ``type=`` for counts that may be 0
nonnegative_int = _bounded_int(0, "an integer >= 0")


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Call ``main(argv)``; a ``ConfigError`` / ``InputError`` becomes ``error: ...`` lines on stderr
    and exit status 2 (no traceback). Use as ``if __name__ == "__main__": run_main(main)``."""
    try:
        return main(argv)
    except ConfigError as err:
        for line in str(err).splitlines() or ["invalid configuration"]:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Git commit / dirty flag of the source tree, package versions, command line and time."""
    root = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], root) if commit else None
    versions: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "versions": {"python": platform.python_version(), **versions},
        "argv": list(sys.argv[1:] if argv is None else argv),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else None,
        "cwd": os.getcwd(),
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }
