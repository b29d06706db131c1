"""Precomputed VAE latents and prompt embeddings for SDXL training (optional).

    python -m sdxl.latent_cache --data DATA --model MODEL --out OUT [--resolution 1024 --crop center ...]

``DATA`` is an image folder (sidecar captions or an index file inside), a ``.jsonl``/``.csv`` index,
a folder of ``.tar`` shards or a brace pattern of shards (see ``sdxl.data``). ``MODEL`` is an SDXL hub
id or local folder (``sdxl.teacher.load_sdxl``). The cache goes to ``OUT/<key>/`` where ``key`` is the
first 16 hex digits of a SHA-256 over (model, VAE, encoder dtype, resolution, crop mode, flip, seed,
format version, dataset listing = every file's path, caption and byte size): a run with the same
inputs finds the finished cache and returns at once; a change to any of them gives a new key.

What is stored, per sample (safetensors shards ``shard-00000.safetensors`` ..., ``index.json``):

    latent_mean   (4, R/8, R/8)  s * (mu - shift)      posterior mean of the VAE encoder
    latent_std    (4, R/8, R/8)  s * sigma             posterior standard deviation
    prompt_embeds (77, 2048)     sdxl.teacher.PromptEncoder (both text encoders' penultimate states)
    text_embeds   (1280,)        pooled, projected output of text encoder 2
    time_ids      (6,)           original_size + crop_top_left + target_size (sdxl.teacher.make_time_ids)
    original_size, crop_top_left (2,) each; captions and source names in the shard's metadata

with ``s = vae.config.scaling_factor`` (0.13025 for SDXL) and ``shift = vae.config.shift_factor``
(None = 0 for SDXL). Storing the posterior (mean and std) instead of one sample, as diffusers' LCM
example effectively does with ``latent_dist.sample()``, lets training draw a fresh
``z = latent_mean + latent_std * eps`` every epoch (``sample_latents``), which equals
``encode_latents(vae, x) = s * latent_dist.sample()`` in distribution (and exactly, for the same eps).
Caching freezes the augmentation: each image keeps the one crop/flip it got (seed, epoch 0); use
center crops for cached training.

Resume: shards are written to a temporary name and renamed when complete; ``index.json`` lists the
finished ones, and a rerun skips them (their images are not even decoded). Unreadable images are
skipped and counted (``index.json["skipped"]``).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from odecm.config import StrictModel
from sdxl.data import ImageCaptionDataset, WebImageCaptionDataset, expand_shards, list_folder, read_index
from sdxl.teacher import load_sdxl, make_time_ids, resolve_dtype

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "text_embeds", "time_ids", "original_size",
               "crop_top_left")


class LatentCacheConfig(StrictModel):
    """Settings of one cache build (the CLI's flags)."""

    data: str
    out: str
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    vae: str | None = None
    index: str | None = None
    resolution: int = Field(1024, ge=8)
    crop: str = Field("center", pattern="^(center|random)$")
    flip: bool = False
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(256, ge=1)
    encode_dtype: str = Field("fp32", pattern="^(fp32|float32|bf16|bfloat16|fp16|float16)$")
    store_dtype: str = Field("fp16", pattern="^(fp32|float32|bf16|bfloat16|fp16|float16)$")
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------
# encoders


@dataclass
class Encoders:
    """What the cache needs from a model: the VAE and ``encode_prompts(captions) -> (prompt_embeds,
    text_embeds)`` (``sdxl.teacher.PromptEncoder``). ``name`` identifies the model in the cache key."""

    vae: torch.nn.Module
    encode_prompts: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
    name: str


def load_encoders(model: str, vae: str | None = None, dtype: str = "fp32", device: str = "cpu") -> Encoders:
    """VAE (fp32 unless ``vae`` names an fp16-safe one) and both text encoders via ``sdxl.teacher.load_sdxl``."""
    kw = dict(vae=vae, dtype=dtype, device=device, text_encoders=True, load_vae=True)
    if "load_unet" in inspect.signature(load_sdxl).parameters:
        kw["load_unet"] = False
    parts = load_sdxl(model, **kw)
    parts.unet = None  # not needed here; free it if load_sdxl loaded it
    name = json.dumps(dict(model=_model_id(model), vae=_model_id(vae) if vae else None, dtype=dtype))
    return Encoders(parts.vae, parts.prompt_encoder(), name)


def _model_id(model: str) -> str:
    return str(Path(model).resolve()) if Path(model).exists() else model


@torch.no_grad()
def encode_posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> (s * (mu - shift), s * sigma) of the VAE posterior, float32."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean.float() - shift) * scale, dist.std.float() * scale


def sample_latents(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample ``z = latent_mean + latent_std * eps``, eps ~ N(0, I) (float32)."""
    mean = batch["latent_mean"].float()
    eps = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else generator.device)
    return mean + batch["latent_std"].float() * eps.to(mean.device)


# ----------------------------------------------------------------------------------------------------
# sources and cache key


def _is_shards(data: str) -> bool:
    path = Path(data)
    if data.endswith(".tar") or "{" in data:
        return True
    return path.is_dir() and any(path.glob("*.tar")) and not any(
        p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in path.iterdir())


@dataclass
class _Unit:
    """A piece of the source that becomes one cache shard."""

    name: str
    samples: Callable[[], Iterator[dict]]


def _units(cfg: LatentCacheConfig) -> tuple[list[_Unit], list, Callable[[], int]]:
    """(units, listing for the key, skipped-count getter). One unit per tar shard or ``shard_size`` records."""
    kw = dict(resolution=cfg.resolution, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed)
    if _is_shards(cfg.data):
        shards = expand_shards(cfg.data)
        datasets = [WebImageCaptionDataset([s], shuffle_shards=False, **kw) for s in shards]
        listing = [(str(Path(s).resolve()), os.path.getsize(s)) for s in shards]
        units = [_Unit(s, (lambda d=d: iter(d))) for s, d in zip(shards, datasets)]
        return units, listing, lambda: sum(d.stats.count for d in datasets)
    if cfg.index is not None:
        records = read_index(cfg.index)
    elif Path(cfg.data).is_file():
        records = read_index(cfg.data)
    else:
        records = list_folder(cfg.data)
    dataset = ImageCaptionDataset(records, **kw)
    listing = [(str(Path(r.path).resolve()), r.caption, os.path.getsize(r.path) if os.path.exists(r.path) else -1)
               for r in records]

    def unit(first: int, last: int) -> Iterator[dict]:
        for j in range(first, last):
            sample = dataset.try_get(j, epoch=0)
            if sample is not None:
                yield sample

    units = [_Unit(f"records {a}..{min(a + cfg.shard_size, len(records)) - 1}",
                   (lambda a=a: unit(a, min(a + cfg.shard_size, len(records)))))
             for a in range(0, len(records), cfg.shard_size)]
    return units, listing, lambda: dataset.stats.count


def cache_key(cfg: LatentCacheConfig, model_name: str, listing: list) -> str:
    """16 hex digits of SHA-256 over everything that changes the cached values."""
    payload = dict(version=FORMAT_VERSION, model=model_name, resolution=cfg.resolution, crop=cfg.crop,
                   flip=cfg.flip, seed=cfg.seed if (cfg.crop == "random" or cfg.flip) else None,
                   store_dtype=cfg.store_dtype, listing=listing)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# building


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def _encode_unit(unit: _Unit, encoders: Encoders, cfg: LatentCacheConfig) -> tuple[dict, list, list]:
    store = resolve_dtype(cfg.store_dtype)
    parts: dict[str, list] = {k: [] for k in TENSOR_KEYS}
    captions, names = [], []
    for chunk in _batches(unit.samples(), cfg.batch_size):
        pixels = torch.stack([s["pixel_values"] for s in chunk])
        original = torch.tensor([s["original_size"] for s in chunk], dtype=torch.long)
        crop = torch.tensor([s["crop_top_left"] for s in chunk], dtype=torch.long)
        target = torch.tensor([s["target_size"] for s in chunk], dtype=torch.long)
        mean, std = encode_posterior(encoders.vae, pixels)
        prompt_embeds, text_embeds = encoders.encode_prompts([s["caption"] for s in chunk])
        values = dict(latent_mean=mean.to(store), latent_std=std.to(store), prompt_embeds=prompt_embeds.to(store),
                      text_embeds=text_embeds.to(store), time_ids=make_time_ids(len(chunk), original, crop, target),
                      original_size=original, crop_top_left=crop)
        for key, value in values.items():
            parts[key].append(value.cpu())
        captions += [s["caption"] for s in chunk]
        names += [str(s.get("index", s.get("key"))) for s in chunk]
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    return tensors, captions, names


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def build_cache(cfg: LatentCacheConfig, encoders: Encoders | None = None, progress: bool = True) -> Path:
    """Build (or finish, or reuse) the cache for ``cfg``; returns its folder ``cfg.out/<key>``.

    ``encoders`` defaults to ``load_encoders(cfg.model, cfg.vae, cfg.encode_dtype, cfg.device)``;
    pass them to reuse loaded models (they are then identified by ``encoders.name``)."""
    units, listing, skipped = _units(cfg)
    name = encoders.name if encoders is not None else json.dumps(
        dict(model=_model_id(cfg.model), vae=_model_id(cfg.vae) if cfg.vae else None, dtype=cfg.encode_dtype))
    key = cache_key(cfg, name, listing)
    folder = Path(cfg.out) / key
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    if index is not None and index.get("complete"):
        log.info("latent cache %s is complete; reusing it", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if index is None or index.get("key") != key:
        index = dict(key=key, version=FORMAT_VERSION, complete=False, model=name, latents="posterior_mean_std",
                     config=cfg.model_dump(), num_units=len(units), shards={}, num_samples=0, skipped=0)
    if encoders is None:
        encoders = load_encoders(cfg.model, cfg.vae, cfg.encode_dtype, cfg.device)
    index["scaling_factor"] = float(encoders.vae.config.scaling_factor)
    index["shift_factor"] = getattr(encoders.vae.config, "shift_factor", None)
    from tqdm.auto import tqdm

    for number, unit in enumerate(tqdm(units, desc="latent cache", disable=not progress)):
        file = f"shard-{number:05d}.safetensors"
        done = index["shards"].get(file)
        if done is not None and (done["count"] == 0 or (folder / file).is_file()):
            continue
        before = skipped()
        tensors, captions, names = _encode_unit(unit, encoders, cfg)
        if tensors:
            tmp = folder / (file + ".tmp")
            save_file(tensors, str(tmp), metadata=dict(captions=json.dumps(captions), names=json.dumps(names),
                                                      source=unit.name))
            os.replace(tmp, folder / file)
        index["shards"][file] = dict(count=len(captions), skipped=skipped() - before, source=unit.name)
        _write_json(index_path, index)
    index["num_samples"] = sum(s["count"] for s in index["shards"].values())
    index["skipped"] = sum(s["skipped"] for s in index["shards"].values())
    index["complete"] = True
    _write_json(index_path, index)
    log.info("latent cache %s: %d samples, %d skipped", folder, index["num_samples"], index["skipped"])
    return folder


# ----------------------------------------------------------------------------------------------------
# reading


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


def main(argv: Sequence[str] | None = None) -> Path:
    from odecm.cli import add_config_args, config_from_args

    parser = add_config_args(argparse.ArgumentParser(prog="python -m sdxl.latent_cache",
                                                     description=__doc__.split("\n\n")[0]))
    cfg = config_from_args(LatentCacheConfig, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = build_cache(cfg)
    index = json.loads((folder / "index.json").read_text())
    print(f"latent cache: {folder} ({index['num_samples']} samples, {index['skipped']} skipped)")
    return folder


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
