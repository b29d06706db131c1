"""On-disk model cache of the image world: ``<cache_dir>/image_world/<kind>-<hash>.{safetensors,json}``.

The key is ``sha256`` of the canonical JSON of everything that determines the model (data
fingerprint, architecture, training settings, seed, ``CODE_VERSION``); any change gives a new key, so
a stale model is never loaded. Writes are atomic (``odecm.atomic``: a private temporary name, then a rename), the JSON
written last, so a half-written entry is never seen as complete. ``cache_dir`` defaults to
``odecm.runs.cache_root()`` (``$ODECM_CACHE_DIR``, else ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

from torch import nn

from odecm.atomic import atomic_path, write_text_atomic
from odecm.runs import cache_root as odecm_cache_root

__all__ = ["CODE_VERSION", "cache_root", "config_key", "CacheEntry", "cached_module"]

#: bump when a change to the training code changes what a cached model would be
CODE_VERSION = 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir / image_world`` (default: ``odecm.runs.cache_root()``, i.e. ``$ODECM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``)."""
    base = Path(cache_dir) if cache_dir is not None else odecm_cache_root()
    return base / "image_world"


def config_key(config: dict[str, Any]) -> str:
    """20 hex digits of sha256 over the canonical JSON (sorted keys) of ``config`` plus ``CODE_VERSION``."""
    blob = json.dumps({"code_version": CODE_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class CacheEntry:
    """One cached model: ``weights`` (safetensors) and ``meta`` (JSON: the keyed config + ``info``)."""

    def __init__(self, kind: str, config: dict[str, Any], cache_dir: str | Path | None = None):
        self.kind, self.config = kind, config
        self.key = config_key(config)
        root = cache_root(cache_dir)
        self.weights = root / f"{kind}-{self.key}.safetensors"
        self.meta = root / f"{kind}-{self.key}.json"

    def exists(self) -> bool:
        return self.weights.exists() and self.meta.exists()

    def load(self, module: nn.Module) -> dict[str, Any]:
        """Load the weights into ``module`` (strict) and return the stored ``info``."""
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(self.weights)))
        return json.loads(self.meta.read_text()).get("info", {})

    def save(self, module: nn.Module, info: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        self.weights.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.weights) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
        write_text_atomic(self.meta, json.dumps({"kind": self.kind, "key": self.key, "config": self.config,
                                                 "info": info or {}}, indent=1, sort_keys=True, default=str))


def cached_module(kind: str, config: dict[str, Any], module: nn.Module, train: Callable[[nn.Module], dict[str, Any]],
                  cache_dir: str | Path | None = None, use_cache: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``module``'s weights from the cache entry of ``(kind, config)``, or run ``train(module)``
    (returning an ``info`` dict) and store the result. Returns ``(module, info)``; ``info`` holds
    ``"cache": "hit" | "built"``, the key and the path."""
    entry = CacheEntry(kind, config, cache_dir)
    status = "built"
    if use_cache and entry.exists():
        try:
            info = entry.load(module)
            status = "hit"
        except (RuntimeError, ValueError, OSError) as err:  # stale layout under an unchanged key: rebuild
            warnings.warn(f"cache entry {entry.weights} does not load ({err}); rebuilding it")
    if status == "built":
        info = train(module)
        if use_cache:
            entry.save(module, info)
    module.eval().requires_grad_(False)
    return module, {**info, "cache": status, "key": entry.key, "path": str(entry.weights)}
