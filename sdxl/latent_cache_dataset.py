"""Reading a finished latent cache (``python -m sdxl.latent_cache``): dataset, collate, cond, posterior samples."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from sdxl.teacher import resolve_dtype

TENSOR_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "text_embeds", "time_ids", "original_size",
               "crop_top_left")


def sample_latents(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample ``z = latent_mean + latent_std * eps``, eps ~ N(0, I) (float32)."""
    mean = batch["latent_mean"].float()
    eps = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
    return mean + batch["latent_std"].float() * eps.to(mean.device)


class CachedLatentDataset(Dataset):
    """Map-style dataset over a finished cache folder (``build_cache``'s return value).

    ``dataset[i]`` -> dict(latent_mean, latent_std, prompt_embeds, text_embeds, time_ids (float32),
    original_size, crop_top_left, caption, index). Tensors are read lazily from the safetensors
    shards (memory-mapped); works with ``sdxl.data.ShardedSampler`` and DataLoader workers. Draw a
    latent with ``sample_latents(batch, generator)``; ``cond(batch)`` is the teacher's cond dict.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype | str = torch.float32):
        self.folder = Path(folder)
        self.index = json.loads((self.folder / "index.json").read_text())
        if not self.index.get("complete"):
            raise ValueError(f"latent cache {self.folder} is incomplete; rerun python -m sdxl.latent_cache")
        self.dtype = resolve_dtype(dtype)
        self.files = [f for f, s in sorted(self.index["shards"].items()) if s["count"] > 0]
        counts = [self.index["shards"][f]["count"] for f in self.files]
        self.offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
        self.captions = []
        for file in self.files:
            with safe_open(str(self.folder / file), "pt") as handle:
                self.captions += json.loads(handle.metadata()["captions"])
        self._handles: dict = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):  # open file handles stay in their process
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _locate(self, i: int) -> tuple[str, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = 0, len(self.files) - 1
        while lo < hi:  # last shard whose offset <= i
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.offsets[mid] <= i else (lo, mid - 1)
        return self.files[lo], i - self.offsets[lo]

    def __getitem__(self, key) -> dict:
        i = int(key[0] if isinstance(key, tuple) else key)
        file, row = self._locate(i)
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        handle = self._handles[file]
        item = {k: handle.get_slice(k)[row] for k in TENSOR_KEYS}
        for k in ("latent_mean", "latent_std", "prompt_embeds", "text_embeds", "time_ids"):
            item[k] = item[k].to(self.dtype)
        item["caption"], item["index"] = self.captions[i], i
        return item


def collate_cached(items: Sequence[dict]) -> dict:
    """Stack cached items; captions and indices as lists."""
    batch = {k: torch.stack([it[k] for it in items]) for k in TENSOR_KEYS}
    batch["caption"] = [it["caption"] for it in items]
    batch["index"] = [it["index"] for it in items]
    return batch


def cond(batch: dict, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    """The teacher/student conditioning dict (prompt_embeds, text_embeds, time_ids) of a cached batch."""
    out = {k: batch[k] for k in ("prompt_embeds", "text_embeds", "time_ids")}
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}
