"""Checks at the door: every config problem is found before any model loads and before any folder is made.

Shared checks of a model source, a VAE's downsampling factor and a device (one implementation for
``sdxl.train``, ``sdxl.precompute_targets``, ``sdxl.reference``, ``sdxl.sample`` and ``sdxl.latent_cache``):

* ``model_source_problem`` / ``check_model_source``: ``"tiny"``, an existing folder in diffusers layout
  (a pipeline folder holds ``model_index.json``, a VAE folder ``config.json``), or a hub id ``org/name``;
  with ``HF_HUB_OFFLINE`` set, a hub id must be in the local Hugging Face cache;
* ``vae_factor_problem``: the image resolution is a multiple of the VAE's downsampling factor
  ``2^(len(block_out_channels) - 1)``, read from the VAE's ``config.json`` without loading it (skipped
  when the config cannot be read here, e.g. an uncached hub id online);
* ``device_problem`` / ``check_device``: a torch device string whose device exists here.

``check_config(cfg, world_size, command)`` (``sdxl.train`` and ``sdxl.precompute_targets``) raises one
``odecm.cli.InputError`` listing every problem, one line each, naming the key, the value and what is
allowed (``odecm.cli.run_main`` prints them as ``error: ...`` lines without a traceback). What it checks
(beyond the pydantic config's own types and ranges):

* packages a config names: bitsandbytes for ``distill.optim.name=adamw8bit``, xformers for
  ``speed.attention=xformers``, tensorboard / wandb for ``log_with``;
* ``distill.batch_size`` divisible by the number of processes (it is the global batch);
* ``model.pretrained`` / ``model.vae`` (``model_source_problem``), and ``data.resolution`` against the
  VAE's factor when images are encoded;
* the grid, on the model's own scheduler config (a small JSON file, not the weights): ``distill.grid_size``
  divides the training timesteps and ``t_0 < t_1 < ... < t_N`` (the skip grid with N = 1000 and
  diffusers indexing gives ``t_0 = t_1 = 0``); ``validation.steps`` k <= N;
* data: the path exists and lists samples (``sdxl.data.open_dataset``), at least one batch per process;
  a latent cache or precomputed-target folder is complete, and targets were made with this run's
  teacher, solver and grid;
* ``precompute_targets``: ``distill.method`` is ``direct_cd`` (its targets are Direct CD's) and the data
  are images or a latent cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from odecm.cli import InputError
from odecm.config import ConfigError

if TYPE_CHECKING:
    from .train_config import SDXLTrainConfig

__all__ = ["check_config", "scheduler_config_of", "HUB_ID", "model_source_problem", "check_model_source",
           "vae_config_of", "vae_factor", "vae_factor_problem", "device_problem", "check_device"]

#: ``org/name`` of a Hugging Face hub repository
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_MODEL_ALLOWED = "allowed: 'tiny', a folder in diffusers layout or a hub id org/name"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------ model sources
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("model_index.json", "config.json"))
    except Exception:  # not a valid repo id
        return False


def model_source_problem(key: str, value: str | None, marker: str | None = None) -> str | None:
    """What is wrong with a model source, or None. ``value``: None (not used), ``"tiny"``, a folder holding
    ``marker`` (default: ``config.json`` for a key ending in ``vae``, else ``model_index.json``), or a hub
    id ``org/name`` (offline: one in the local Hugging Face cache)."""
    if value is None or value == "tiny":
        return None
    marker = marker or ("config.json" if key.endswith("vae") else "model_index.json")
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            return f"{key}={value}: is a file; {_MODEL_ALLOWED}"
        if not (p / marker).exists():
            return f"{key}={value}: holds no {marker}; {_MODEL_ALLOWED}"
        return None
    first = value.split("/")[0]
    if not HUB_ID.match(value) or Path(first).expanduser().is_dir():
        return f"{key}={value}: no such folder, and not a hub id; {_MODEL_ALLOWED}"
    if _hub_offline() and not _hub_cached(value):
        return (f"{key}={value}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; allowed: a cached "
                f"hub id or a local folder (run `huggingface-cli download {value}` online)")
    return None


def check_model_source(key: str, value: str | None, marker: str | None = None) -> None:
    """``model_source_problem`` as an ``InputError`` naming ``key``."""
    problem = model_source_problem(key, value, marker)
    if problem:
        raise InputError(problem)


def vae_config_of(pretrained: str, vae: str | None = None) -> dict | None:
    """The VAE's ``config.json`` without loading it: the tiny model's, a local folder's, or the local hub
    cache's (``vae`` folder or hub id, else ``<pretrained>/vae``); None when it cannot be read here."""
    if vae is None and pretrained == "tiny":
        from .tiny import TINY_VAE_BLOCKS

        return {"block_out_channels": list(TINY_VAE_BLOCKS)}
    source, sub = (vae, "config.json") if vae else (pretrained, "vae/config.json")
    path = Path(source).expanduser() / sub
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, sub)
        except Exception:  # not a repo id
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def vae_factor(pretrained: str, vae: str | None = None) -> int | None:
    """The VAE's downsampling factor ``2^(len(block_out_channels) - 1)`` (SDXL: 8), or None when unknown."""
    config = vae_config_of(pretrained, vae)
    blocks = config.get("block_out_channels") if isinstance(config, dict) else None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None


def vae_factor_problem(key: str, resolution: int, pretrained: str, vae: str | None = None) -> str | None:
    """``resolution`` must be a multiple of the VAE's downsampling factor (when it can be read here)."""
    factor = vae_factor(pretrained, vae)
    if factor is None or resolution % factor == 0:
        return None
    return (f"{key}={resolution}: must be a multiple of the VAE's downsampling factor {factor}; allowed e.g. "
            f"{resolution - resolution % factor or factor}")


# ------------------------------------------------------------------------------------------ devices
_DEVICE_ALLOWED = "allowed: 'cpu', 'cuda', 'cuda:<index>' or 'mps', of a device this machine has"


def device_problem(key: str, value: str | None) -> str | None:
    """What is wrong with a torch device string (None: the default device), or None."""
    import torch

    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        return f"{key}={value}: not a torch device; {_DEVICE_ALLOWED}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{key}={value}: this machine has no CUDA device; allowed: 'cpu'"
        if device.index is not None and device.index >= count:
            return f"{key}={value}: this machine has {count} CUDA device(s); allowed: 'cuda:0' .. 'cuda:{count - 1}'"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"{key}={value}: MPS is not available here; allowed: 'cpu'"
    return f"{key}={value}: device type {device.type!r} is not supported; {_DEVICE_ALLOWED}"


def check_device(key: str, value: str | None) -> None:
    """``device_problem`` as an ``InputError`` naming ``key``."""
    problem = device_problem(key, value)
    if problem:
        raise InputError(problem)


# ------------------------------------------------------------------------------------------ sdxl.train
def scheduler_config_of(pretrained: str) -> dict | None:
    """The model's scheduler config (a small JSON file): the tiny model's, a local folder's, or the hub's
    (read from the local cache or fetched alone); None when it cannot be read here."""
    if pretrained == "tiny":
        from .tiny import SDXL_SCHEDULER_CONFIG

        return dict(SDXL_SCHEDULER_CONFIG)
    local = Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    if local.exists():
        return json.loads(local.read_text())
    try:
        from diffusers.schedulers import EulerDiscreteScheduler

        return dict(EulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler"))
    except Exception:  # offline without a cached copy: the loader reports it when the weights load
        return None


def _grid_problems(cfg: SDXLTrainConfig) -> list[str]:
    import torch

    from odecm.grids import make_grid
    from odecm.schedules import DiscreteSchedule

    sched_cfg = scheduler_config_of(cfg.model.pretrained)
    if sched_cfg is None:
        return []
    try:
        schedule = DiscreteSchedule.from_scheduler_config(dict(sched_cfg), cfg.model.timestep_offset)
    except (ValueError, KeyError) as exc:
        return [f"model.pretrained={cfg.model.pretrained!r}: its scheduler config is not supported ({exc})"]
    d, T = cfg.distill, schedule.num_train_timesteps
    if d.grid == "skip" and T % d.grid_size:
        divisors = [k for k in (10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000) if T % k == 0]
        return [f"distill.grid_size={d.grid_size} does not divide the model's {T} training timesteps "
                f"(distill.grid='skip'); allowed: a divisor of {T}, e.g. {divisors}"]
    try:
        grid = make_grid(d.grid, schedule, d.grid_size)
    except ValueError as exc:
        return [f"distill.grid_size={d.grid_size} with distill.grid={d.grid!r}: {exc}"]
    steps = grid[1:] - grid[:-1]
    if not bool((steps > 0).all()):
        n = int(torch.nonzero(steps <= 0)[0])
        return [f"distill.grid_size={d.grid_size} with distill.grid={d.grid!r} and model.timestep_offset="
                f"{cfg.model.timestep_offset} gives t_{n} = t_{n + 1} = {float(grid[n]):g} (a zero-length step); "
                f"allowed: distill.grid_size < {T}, or model.timestep_offset=1 (the paper's indexing)"]
    too_many = [k for k in cfg.validation.steps if k > d.grid_size]
    if cfg.validation.every and too_many:
        return [f"validation.steps={cfg.validation.steps}: k={too_many[0]} > distill.grid_size={d.grid_size}; "
                f"allowed: 1 <= k <= {d.grid_size}"]
    return []


def _data_problems(cfg: SDXLTrainConfig, world_size: int) -> list[str]:
    d = cfg.data
    local = max(cfg.distill.batch_size // world_size, 1)
    if d.source == "synthetic":
        if d.num_samples < local:
            return [f"data.num_samples={d.num_samples} is less than one batch per process ({local}); "
                    f"allowed: >= {local}"]
        return []
    if d.source == "images":
        from sdxl.data import data_kind, open_dataset

        if d.index is None and data_kind(d.path, "data.path") == "shards":
            return [f"data.path={d.path!r} names webdataset shards, which sdxl.train does not stream; "
                    "allowed: a folder or a .jsonl/.csv index (or cache the shards: python -m sdxl.latent_cache)"]
        dataset = open_dataset(d.path, d.index, allow_empty_captions=d.allow_empty_captions, key="data.path",
                               resolution=d.resolution)
        count = len(dataset)
    else:
        folder = Path(d.path).expanduser()
        if not folder.is_dir():
            return [f"data.path={d.path!r}: no such folder (data.source={d.source!r} reads a folder written by "
                    f"python -m sdxl.{'latent_cache' if d.source == 'latent_cache' else 'precompute_targets'})"]
        if d.source == "latent_cache":
            index_file = folder / "index.json"
            index = json.loads(index_file.read_text()) if index_file.exists() else {}
            if not index.get("complete"):
                return [f"data.path={d.path!r} is not a complete latent cache (no complete index.json); "
                        "run python -m sdxl.latent_cache first"]
            count = sum(s["count"] for s in index["shards"].values())
        else:
            from .batches import read_target_index

            index = read_target_index(folder)
            problems = _targets_match(cfg, index)
            if problems:
                return problems
            count = sum(index["shards"].values())
    if count < local:
        return [f"data.path={d.path!r} holds {count} samples, fewer than one batch per process ({local}); "
                f"allowed: at least {local} samples, or a smaller distill.batch_size"]
    return []


#: precomputed-target index fields that must equal the training config (index key -> config key)
TARGET_FIELDS = {"solver": "distill.solver", "grid_size": "distill.grid_size", "grid": "distill.grid",
                 "timestep_offset": "model.timestep_offset", "guidance_scale": "teacher.guidance_scale",
                 "cfg_convention": "teacher.cfg_convention", "uncond": "teacher.uncond", "model": "model.pretrained"}


def _targets_match(cfg: SDXLTrainConfig, index: dict) -> list[str]:
    """Precomputed targets answer one teacher / solver / grid: the run must name the same."""
    values = {"distill.solver": cfg.distill.solver, "distill.grid_size": cfg.distill.grid_size,
              "distill.grid": cfg.distill.grid, "model.timestep_offset": cfg.model.timestep_offset,
              "teacher.guidance_scale": cfg.teacher.guidance_scale, "teacher.cfg_convention": cfg.teacher.cfg_convention,
              "teacher.uncond": cfg.teacher.uncond, "model.pretrained": cfg.model.pretrained}
    return [f"{key}={values[key]!r} but the precomputed targets in data.path={cfg.data.path!r} were made with "
            f"{index[field]!r}; allowed: {index[field]!r} (or precompute targets for this config)"
            for field, key in TARGET_FIELDS.items() if field in index and index[field] != values[key]]


def check_config(cfg: SDXLTrainConfig, world_size: int = 1, command: str = "train") -> None:
    """Raise ``InputError`` listing every problem of ``cfg`` for ``command`` ("train" or "precompute")."""
    problems: list[str] = []

    def guard(fn, *args) -> None:
        try:
            problems.extend(fn(*args))
        except ConfigError as err:  # InputError, a missing package, ...
            problems.extend(str(err).splitlines())

    if command == "precompute":
        if cfg.distill.method != "direct_cd":
            problems.append(f"distill.method={cfg.distill.method!r}: python -m sdxl.precompute_targets stores Direct CD "
                            "targets (they do not depend on the student; CD targets do); allowed: 'direct_cd'")
        if cfg.data.source == "targets":
            problems.append("data.source='targets' is what precompute_targets writes; allowed: 'images', "
                            "'latent_cache', 'synthetic'")
    else:
        from odecm.optim import check_optimizer

        guard(lambda: check_optimizer(cfg.distill.optim.name, "distill.optim.name") or [])
    if cfg.distill.batch_size % world_size:
        problems.append(f"distill.batch_size={cfg.distill.batch_size} is not divisible by the {world_size} processes "
                        f"(it is the global batch); allowed: a multiple of {world_size}")
    if cfg.speed.attention == "xformers" and not _installed("xformers"):
        problems.append("speed.attention='xformers' needs the xformers package (pip install xformers); "
                        "allowed without it: 'sdpa', 'default'")
    if command == "train" and cfg.log_with in ("tensorboard", "wandb") and not _installed(cfg.log_with):
        extra = " (or pip install 'odecm[track]')" if cfg.log_with == "tensorboard" else ""
        problems.append(f"log_with={cfg.log_with!r} needs the {cfg.log_with} package: pip install {cfg.log_with}{extra}; "
                        "allowed without it: 'none', 'auto'")
    model_problem = model_source_problem("model.pretrained", cfg.model.pretrained)
    if model_problem:
        problems.append(model_problem)
    else:
        guard(_grid_problems, cfg)
    vae_problem = model_source_problem("model.vae", cfg.model.vae)
    if vae_problem:
        problems.append(vae_problem)
    if not (model_problem or vae_problem) and cfg.data.source in ("images", "synthetic"):
        problems.extend(filter(None, [vae_factor_problem("data.resolution", cfg.data.resolution,
                                                         cfg.model.pretrained, cfg.model.vae)]))
    if not (command == "precompute" and cfg.data.source == "targets"):
        guard(_data_problems, cfg, world_size)
    if problems:
        raise InputError("\n".join(problems))
