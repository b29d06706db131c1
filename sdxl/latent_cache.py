"""Precomputed VAE latents and prompt embeddings for SDXL training (optional).

    python -m sdxl.latent_cache --set data=DATA model=MODEL out=OUT [resolution=1024 crop=center ...]

``DATA`` is an image folder (read recursively: metadata files such as HuggingFace ``imagefolder``'s
``metadata.jsonl`` in subfolders, or sidecar captions), a ``.jsonl``/``.csv`` index, a ``.tar`` shard,
a folder of shards or a brace pattern of shards (see ``sdxl.data``). ``MODEL`` is an SDXL hub id or
local folder (``sdxl.teacher.load_sdxl``). The cache goes to ``OUT/<key>/`` where ``key`` is the first
16 hex digits of a SHA-256 over (model, VAE, encoder dtype, resolution, crop mode, flip, seed,
transparency background, format version, dataset listing = every file's path, caption and byte size):
a run with the same inputs finds the finished cache and returns at once; a change to any of them
gives a new key. Bad ``data`` / ``index`` paths, unknown extensions, listings without usable rows,
missing captions (unless ``allow_empty_captions=true``), a ``model`` / ``vae`` that does not exist, a
``device`` this machine lacks and a ``resolution`` that is not a multiple of the VAE's downsampling
factor (``sdxl.checks``, as ``sdxl.train`` and ``sdxl.reference`` check them) are one-line errors before
any folder is made or any model loads.

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

Resume: shards are written to a temporary name of the writing process's own (``odecm.atomic``) and renamed
when complete; ``index.json`` (written the same way) lists the finished ones, and a rerun skips them
(their images are not even decoded).

Bad samples (``sdxl.data_skips``: unreadable or missing images, truncated shards, captions that are not
UTF-8, malformed index lines, ...) are skipped with a one-line warning and counted by reason:
``index.json`` (``skipped``, ``skipped_by_reason``, per shard), ``metrics.json`` (totals, share,
examples) and ``log.jsonl`` (one line per encoded shard) in the cache folder. When more than
``max_skip_fraction`` of the rows are skipped (default 0.05), the build stops (``TooManySkipsError``,
with the counts by reason; ``metrics.json`` says ``"status": "stopped_too_many_skips"``).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterator, Sequence

import torch
from pydantic import Field
from safetensors.torch import save_file

from odecm.cli import InputError
from odecm.config import StrictModel
from odecm.atomic import atomic_path, remove_stale_temps, write_json_atomic
from sdxl.checks import device_problem, model_source_problem, vae_factor_problem
from sdxl.data import (WHITE, ImageCaptionDataset, Skip, SkipStats, TooManySkipsError, WebImageCaptionDataset,
                       data_kind, expand_shards, scan)
from sdxl.latent_cache_dataset import TENSOR_KEYS, CachedLatentDataset, collate_cached, cond, sample_latents
from sdxl.teacher import load_sdxl, make_time_ids, resolve_dtype

__all__ = ["LatentCacheConfig", "Encoders", "load_encoders", "encode_posterior", "check_models", "cache_key", "build_cache",
           "main",
           "CachedLatentDataset", "collate_cached", "cond", "sample_latents", "TENSOR_KEYS", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: 16-bit and transparent images decoded correctly; skip counts by reason


Byte = Annotated[int, Field(ge=0, le=255)]


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
    allow_empty_captions: bool = Field(False, description="images without a caption get '' instead of an error")
    max_skip_fraction: float = Field(0.05, ge=0, le=1, description="stop when more of the rows are skipped")
    background: tuple[Byte, Byte, Byte] = Field(WHITE, description="RGB that transparent pixels are composited on")


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


# ----------------------------------------------------------------------------------------------------
# sources and cache key


@dataclass
class _Unit:
    """A piece of the source that becomes one cache shard: ``samples(stats)`` yields its samples and
    counts them (delivered, skipped by reason) into ``stats``."""

    name: str
    samples: Callable[[SkipStats], Iterator[dict]]


@dataclass
class _Source:
    """The units of a build, the listing for the key, the rows the listing skipped and the row count
    (None for tar shards, whose samples are only known once read)."""

    units: list[_Unit]
    listing: list
    listing_skips: list[Skip]
    total: int | None


def _source(cfg: LatentCacheConfig) -> _Source:
    """Checks at the door, then one unit per tar shard or per ``shard_size`` records."""
    kw = dict(resolution=cfg.resolution, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed, background=cfg.background)
    if cfg.index is None and data_kind(cfg.data, "data") == "shards":
        shards = expand_shards(cfg.data, "data")

        def shard_samples(shard: str, stats: SkipStats) -> Iterator[dict]:
            dataset = WebImageCaptionDataset([shard], shuffle_shards=False, key="data",
                                             allow_empty_captions=cfg.allow_empty_captions, **kw)
            yield from dataset
            stats.merge(dataset.stats)  # every skip of the shard, also those after its last good sample

        units = [_Unit(s, (lambda stats, s=s: shard_samples(s, stats))) for s in shards]
        listing = [(str(Path(s).resolve()), os.path.getsize(s)) for s in shards]
        return _Source(units, listing, [], None)
    found = scan(cfg.data, cfg.index, cfg.allow_empty_captions, key="data")
    dataset = ImageCaptionDataset(found.records, listing_skips=found.skips, **kw)
    records = dataset.records
    listing = [(str(Path(r.path).resolve()), r.caption, os.path.getsize(r.path) if os.path.exists(r.path) else -1)
               for r in records]

    def unit(first: int, last: int, stats: SkipStats) -> Iterator[dict]:
        for j in range(first, last):
            sample = dataset.get_or_skip(j, epoch=0)
            if isinstance(sample, Skip):
                stats.add(sample)
            else:
                stats.delivered += 1
                yield sample

    units = [_Unit(f"records {a}..{min(a + cfg.shard_size, len(records)) - 1}",
                   (lambda stats, a=a: unit(a, min(a + cfg.shard_size, len(records)), stats)))
             for a in range(0, len(records), cfg.shard_size)]
    return _Source(units, listing, found.skips, dataset.num_rows)


def check_models(cfg: LatentCacheConfig) -> None:
    """The checks ``sdxl.train`` and ``sdxl.reference`` make at the door (``sdxl.checks``): ``model`` and ``vae``
    exist (folder or hub id; offline: cached), ``device`` is one this machine has, ``resolution`` is a
    multiple of the VAE's downsampling factor. One ``InputError`` listing every problem."""
    problems = [model_source_problem("model", cfg.model), model_source_problem("vae", cfg.vae)]
    if not any(problems):
        problems.append(vae_factor_problem("resolution", cfg.resolution, cfg.model, cfg.vae))
    problems.append(device_problem("device", cfg.device))
    if any(problems):
        raise InputError("\n".join(p for p in problems if p))


def cache_key(cfg: LatentCacheConfig, model_name: str, listing: list) -> str:
    """16 hex digits of SHA-256 over everything that changes the cached values."""
    payload = dict(version=FORMAT_VERSION, model=model_name, resolution=cfg.resolution, crop=cfg.crop,
                   flip=cfg.flip, seed=cfg.seed if (cfg.crop == "random" or cfg.flip) else None,
                   store_dtype=cfg.store_dtype, background=list(cfg.background), listing=listing)
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
def _encode_unit(unit: _Unit, encoders: Encoders, cfg: LatentCacheConfig,
                 stats: SkipStats) -> tuple[dict, list, list]:
    store = resolve_dtype(cfg.store_dtype)
    parts: dict[str, list] = {k: [] for k in TENSOR_KEYS}
    captions, names = [], []
    for chunk in _batches(unit.samples(stats), cfg.batch_size):
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


def _append_log(folder: Path, record: dict) -> None:
    with (folder / "log.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _unit_record(stats: SkipStats) -> dict:
    """What index.json keeps of a finished unit's skips (enough to rebuild the totals on resume)."""
    return dict(skipped=stats.count, skipped_by_reason={r: n for r, n in stats.by_reason.items() if n},
                skip_examples={r: v for r, v in stats.examples.items() if v})


def _restore(stats: SkipStats, entry: dict) -> None:
    """Add a finished unit's counts (from index.json) to the run's stats."""
    vector = [entry["count"]] + [entry.get("skipped_by_reason", {}).get(r, 0) for r in stats.by_reason]
    stats.add_vector(vector)
    stats.add_examples(entry.get("skip_examples", {}))


def door_checks(cfg: LatentCacheConfig, models: bool = True) -> tuple[_Source, SkipStats]:
    """The checks before any model loads or any folder is made: the data listing (a listing that is mostly
    bad rows stops here) and, with ``models``, ``check_models``. ``--check`` runs exactly these."""
    source = _source(cfg)
    if models:
        check_models(cfg)
    stats = SkipStats(cfg.max_skip_fraction, source.total, key="max_skip_fraction")
    stats.extend(source.listing_skips)
    stats.check()
    return source, stats


def build_cache(cfg: LatentCacheConfig, encoders: Encoders | None = None, progress: bool = True) -> Path:
    """Build (or finish, or reuse) the cache for ``cfg``; returns its folder ``cfg.out/<key>``.

    ``encoders`` defaults to ``load_encoders(cfg.model, cfg.vae, cfg.encode_dtype, cfg.device)``;
    pass them to reuse loaded models (they are then identified by ``encoders.name``). The data is
    listed and checked, then (without ``encoders``) the model, VAE, device and resolution
    (``check_models``), all before any folder is made or any model loads (``odecm.cli.InputError``); too
    many skipped samples stop the build with ``TooManySkipsError`` (module docstring)."""
    source, stats = door_checks(cfg, models=encoders is None)
    name = encoders.name if encoders is not None else json.dumps(
        dict(model=_model_id(cfg.model), vae=_model_id(cfg.vae) if cfg.vae else None, dtype=cfg.encode_dtype))
    key = cache_key(cfg, name, source.listing)
    folder = Path(cfg.out) / key
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    if index is not None and index.get("complete"):
        log.info("latent cache %s is complete; reusing it", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)  # shard / index writes of killed builds
    if index is None or index.get("key") != key:
        index = dict(key=key, version=FORMAT_VERSION, complete=False, model=name, latents="posterior_mean_std",
                     config=cfg.model_dump(), num_units=len(source.units), shards={}, num_samples=0, skipped=0)
    for entry in index["shards"].values():
        _restore(stats, entry)
    if encoders is None:
        encoders = load_encoders(cfg.model, cfg.vae, cfg.encode_dtype, cfg.device)
    index["scaling_factor"] = float(encoders.vae.config.scaling_factor)
    index["shift_factor"] = getattr(encoders.vae.config, "shift_factor", None)
    from tqdm.auto import tqdm

    t0, encoded = time.perf_counter(), 0
    for number, unit in enumerate(tqdm(source.units, desc="latent cache", disable=not progress)):
        file = f"shard-{number:05d}.safetensors"
        done = index["shards"].get(file)
        if done is not None and (done["count"] == 0 or (folder / file).is_file()):
            continue
        unit_stats, started = SkipStats(), time.perf_counter()
        tensors, captions, names = _encode_unit(unit, encoders, cfg, unit_stats)
        if tensors:
            with atomic_path(folder / file) as tmp:
                save_file(tensors, str(tmp), metadata=dict(captions=json.dumps(captions), names=json.dumps(names),
                                                          source=unit.name))
        index["shards"][file] = dict(count=len(captions), source=unit.name, **_unit_record(unit_stats))
        write_json_atomic(index_path, index, indent=1)
        encoded += len(captions)
        stats.merge(unit_stats)
        _append_log(folder, dict(event="unit", shard=file, source=unit.name, count=len(captions),
                                 seconds=time.perf_counter() - started, **stats.step_fields(
                                     {r: n for r, n in unit_stats.by_reason.items() if n})))
        try:
            stats.check(final=number == len(source.units) - 1)
        except TooManySkipsError as err:
            _finish(folder, stats, index, "stopped_too_many_skips", time.perf_counter() - t0, encoded, str(err))
            raise
    stats.check(final=True)  # also when every unit was already done
    index["num_samples"] = sum(s["count"] for s in index["shards"].values())
    index["skipped"] = stats.count
    index["skipped_by_reason"] = dict(stats.by_reason)
    index["complete"] = True
    write_json_atomic(index_path, index, indent=1)
    _finish(folder, stats, index, "complete", time.perf_counter() - t0, encoded)
    log.info("latent cache %s: %d samples, %s", folder, index["num_samples"], stats.describe())
    return folder


def _finish(folder: Path, stats: SkipStats, index: dict, status: str, seconds: float, encoded: int,
            error: str | None = None) -> None:
    """metrics.json (totals and skip counts) and the closing log.jsonl line."""
    metrics = dict(status=status, cache=str(folder), num_samples=sum(s["count"] for s in index["shards"].values()),
                   units_done=len(index["shards"]), num_units=index["num_units"], encoded_this_run=encoded,
                   seconds=seconds, samples_per_second=encoded / seconds if seconds > 0 else None, **stats.summary())
    if error:
        metrics["error"] = error
    write_json_atomic(folder / "metrics.json", metrics, indent=1)
    _append_log(folder, dict(event=status, **{k: metrics[k] for k in ("num_samples", "skipped", "skip_fraction")},
                             skipped_by_reason={r: n for r, n in stats.by_reason.items() if n}))


def main(argv: Sequence[str] | None = None) -> Path:
    from odecm.cli import add_config_args, config_from_args, report_check

    parser = add_config_args(argparse.ArgumentParser(prog="python -m sdxl.latent_cache",
                                                     description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    cfg = config_from_args(LatentCacheConfig, args)
    if report_check(args, "sdxl.latent_cache", cfg, door=lambda: door_checks(cfg)):
        return None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = build_cache(cfg)
    index = json.loads((folder / "index.json").read_text())
    reasons = ", ".join(f"{r} {n}" for r, n in index.get("skipped_by_reason", {}).items() if n)
    print(f"latent cache: {folder} ({index['num_samples']} samples, {index['skipped']} skipped"
          + (f": {reasons}" if reasons else "") + ")")
    return folder


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
