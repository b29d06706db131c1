"""Batches of a distillation run: this rank's samples of each global step, their VAE posterior and cond.

Used by ``sdxl.train`` and ``sdxl.precompute_targets`` (both import from here, never from each other).

* ``BatchSource.get(step)``: the samples of global step ``step`` that this rank takes: global slots
  ``r, r + W, ...`` of a shuffled, epoch-wise permutation drawn from the run's seed
  (``sdxl.data.ShardedSampler``), so W processes x B/W == 1 process x B, and a resumed run
  restarts the data stream from the step count.
* ``batch_posterior``: ``(mean, std)`` of the scaled VAE posterior (from a latent cache or encoded).
* ``batch_cond``: the cond dict (stored embeddings, or both text encoders on the captions).
* ``TargetDataset``: a finished ``python -m sdxl.precompute_targets`` folder (Direct CD scheme (c)).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .teacher import make_time_ids

__all__ = ["BatchSource", "batch_source", "source_dataset", "batch_posterior", "batch_cond", "TargetDataset", "collate_targets",
           "TARGET_KEYS", "read_target_index"]

#: what a precomputed-target sample holds (``sdxl.precompute_targets``)
TARGET_KEYS = ("x_tn", "n", "target", "prompt_embeds", "text_embeds", "time_ids")


class BatchSource:
    """``get(step)`` -> this rank's samples of global step ``step`` (dict, global slots r::W).

    Image sources count unreadable samples by reason (``sdxl.data.SkipStats``, summed over processes
    so every rank sees the same totals and stops at the same step when the share exceeds
    ``data.max_skip_fraction``): ``last_skips`` holds the step's counts, ``stats`` the whole run's."""

    def __init__(self, dataset, collate, local_batch: int, seed: int, rank: int, world: int, num_workers: int = 0,
                 stats=None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        from sdxl.data import ShardedSampler

        self.dataset, self.collate, self.local_batch = dataset, collate, local_batch
        self.sampler = ShardedSampler(len(dataset), seed=seed, shuffle=True, rank=rank, world_size=world,
                                      with_epoch=True)
        self.num_workers = num_workers
        self._iter: Iterator | None = None
        self._next_step: int | None = None
        per_epoch = self.sampler.per_rank // local_batch
        if per_epoch == 0:
            raise ValueError(f"the dataset ({len(dataset)} samples) is smaller than one batch per process ({local_batch})")
        self.per_epoch = per_epoch
        self.stats, self.reduce = stats, reduce
        self.last_skips: dict[str, int] = {}

    def _loader(self, step: int) -> Iterator:
        from torch.utils.data import DataLoader

        self.sampler.resume(step, self.local_batch)
        while True:
            loader = DataLoader(self.dataset, batch_size=self.local_batch, sampler=self.sampler,
                                collate_fn=self.collate, num_workers=self.num_workers, drop_last=True)
            yield from loader
            self.sampler.set_epoch(self.sampler.epoch + 1, 0)

    def get(self, step: int) -> dict:
        if self._iter is None or self._next_step != step:
            self._iter = self._loader(step)
        self._next_step = step + 1
        batch = next(self._iter)
        if self.stats is not None:
            from sdxl.data import batch_skip_vector

            vector = batch_skip_vector(batch)
            if self.reduce is not None:
                vector = self.reduce(vector)
            self.last_skips = self.stats.add_vector(vector)
            examples: dict[str, list[str]] = {}
            for record in batch.get("skipped", []):
                examples.setdefault(record.reason, []).append(record.name)
            self.stats.add_examples(examples)
            self.stats.check()  # TooManySkipsError on every rank at the same step
        return batch


def source_dataset(cfg, accelerator):
    """``(dataset, collate, stats)`` of ``cfg.data`` in dataset order; ``stats`` is a ``SkipStats`` for
    image sources (None otherwise). A synthetic source is written under ``<out_dir>/synthetic_data``."""
    d = cfg.data
    if d.source in ("images", "synthetic"):
        from sdxl.data import SkipStats, collate, make_synthetic_dataset, open_dataset

        path, index = d.path, d.index
        if d.source == "synthetic":
            folder = Path(cfg.out_dir) / "synthetic_data"
            if accelerator.is_main_process and not any(folder.glob("*.txt")):
                make_synthetic_dataset(folder, d.num_samples, size=d.resolution, seed=cfg.distill.seed)
            accelerator.wait_for_everyone()
            path, index = str(folder), None
        ds = open_dataset(path, index, allow_empty_captions=d.allow_empty_captions, key="data.path",
                          resolution=d.resolution, crop=d.crop, flip=d.flip, seed=cfg.distill.seed)
        return ds, collate, SkipStats.for_dataset(ds, d.max_skip_fraction, key="data.max_skip_fraction")
    if d.source == "latent_cache":
        from sdxl.latent_cache import CachedLatentDataset, collate_cached

        return CachedLatentDataset(d.path), collate_cached, None
    return TargetDataset(d.path), collate_targets, None


def batch_source(cfg, parts, accelerator) -> BatchSource:
    """The ``BatchSource`` of ``cfg.data`` (a ``SDXLTrainConfig``) for this process (``parts`` unused:
    kept for callers that pass the loaded components)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    dataset, collate, stats = source_dataset(cfg, accelerator)
    reduce = None
    if world > 1 and stats is not None:
        def reduce(vector: torch.Tensor) -> torch.Tensor:
            return accelerator.reduce(vector.to(accelerator.device), reduction="sum").cpu()
    return BatchSource(dataset, collate, cfg.distill.batch_size // world, cfg.distill.seed, rank, world,
                       cfg.data.num_workers, stats, reduce)


def batch_posterior(batch: dict, vae=None, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the scaled VAE posterior: read from a latent-cache batch, or encoded from an
    image batch ``chunk`` images at a time (the VAE encoder's activations at 1024 px are large)."""
    if "latent_mean" in batch:
        return batch["latent_mean"], batch["latent_std"]
    from sdxl.latent_cache import encode_posterior

    pixels = batch["pixel_values"]
    with torch.no_grad(), torch.autocast(vae.device.type, enabled=False):  # the VAE keeps its own dtype
        out = [encode_posterior(vae, pixels[i:i + chunk]) for i in range(0, pixels.shape[0], chunk)]
    return torch.cat([m for m, _ in out]), torch.cat([s for _, s in out])


def batch_cond(batch: dict, parts, device) -> dict:
    """The cond dict of a batch: stored embeddings, or both text encoders on the captions with
    time_ids from the recorded original sizes and crops."""
    if "prompt_embeds" in batch:
        return {k: batch[k].to(device=device, dtype=torch.float32) for k in ("prompt_embeds", "text_embeds", "time_ids")}
    b = len(batch["caption"])
    time_ids = make_time_ids(b, batch["original_size"], batch["crop_top_left"], batch["target_size"], device=device)
    return parts.prompt_encoder().cond(batch["caption"], time_ids)


# ----------------------------------------------------------------------------------------- stored targets
class TargetDataset(Dataset):
    """Map-style dataset over a finished ``precompute_targets`` folder: ``ds[i]`` -> dict of
    ``TARGET_KEYS`` tensors (float32; ``n`` int64) and ``index``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = read_target_index(self.folder)
        self.files = sorted(self.index["shards"])
        counts = [self.index["shards"][f] for f in self.files]
        self.offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
        self._handles: dict = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, key) -> dict:
        from safetensors import safe_open

        i = int(key[0] if isinstance(key, tuple) else key)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = max(j for j in range(len(self.files)) if self.offsets[j] <= i)
        file = self.files[s]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        h = self._handles[file]
        row = i - self.offsets[s]
        item = {k: h.get_slice(k)[row] for k in TARGET_KEYS}
        item = {k: (v.long() if k == "n" else v.float()) for k, v in item.items()}
        item["index"] = i
        return item


def read_target_index(folder: str | Path) -> dict:
    """``index.json`` of a finished ``precompute_targets`` folder (errors name ``data.path``)."""
    from odecm.cli import InputError

    folder = Path(folder)
    index_file = folder / "index.json"
    if not index_file.exists():
        raise InputError(f"data.path={str(folder)!r} holds no index.json of precomputed targets; "
                         "run python -m sdxl.precompute_targets first")
    index = json.loads(index_file.read_text())
    if not index.get("complete"):
        raise InputError(f"data.path={str(folder)!r}: the precomputed targets are incomplete; "
                         "rerun python -m sdxl.precompute_targets with the same config")
    return index


def collate_targets(items: Sequence[dict]) -> dict:
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in TARGET_KEYS}
    batch["index"] = [it["index"] for it in items]
    return batch
