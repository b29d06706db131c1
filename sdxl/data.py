"""Image-caption data for SDXL distillation: the datasets, ``collate`` and ``open_dataset`` (public entry points).

Sources (``sdxl.data_sources``; layouts in ``docs/sdxl_data.md``)
  * a folder, read recursively: metadata / index files (``metadata.jsonl``, ``metadata.csv``, ...; the
    HuggingFace ``imagefolder`` layout with one per subfolder) and sidecar captions (``cat.png`` +
    ``cat.txt``) for images no metadata file governs; or one ``.jsonl`` / ``.csv`` index file
    -> ``ImageCaptionDataset``;
  * webdataset tar shards: members ``<key>.jpg|png|...`` + ``<key>.txt`` or ``<key>.json`` (with a
    caption key) -> ``WebImageCaptionDataset``.
  ``open_dataset(path, ...)`` picks one after the checks at the door (``odecm.cli.InputError`` naming the
  config key: a path that does not exist, an unknown extension, no usable rows, missing captions).

Transform (``sdxl.data_images``; SDXL's micro-conditioning, SDXL paper section 2.2): the image is made
8-bit RGB (16-bit samples scaled by their bit depth, transparency composited over ``background``,
EXIF orientation applied), the shorter side is resized to ``resolution``, the image is optionally
flipped, then cropped to ``resolution x resolution`` (center, or uniform random). A sample is

    dict(pixel_values  (3, R, R) float32 in [-1, 1],
         caption       str,
         original_size (h, w) of the file before resizing,
         crop_top_left (top, left) of the crop in the resized (and flipped) image,
         target_size   (R, R),
         index / key, skipped = list of Skip records of the bad samples stepped over)

so that ``time_ids = original_size + crop_top_left + target_size`` (6 numbers; after ``collate``:
``sdxl.teacher.make_time_ids(B, batch["original_size"], batch["crop_top_left"], batch["target_size"])``).

Randomness. Random crops and flips draw from a generator seeded by ``(seed, epoch, index)`` (webdataset:
``(seed, epoch, crc32(key))``), so a sample's augmentation does not depend on worker count or order.

Bad samples (``sdxl.data_skips``) are skipped, never raised and never turned into data: the map-style
dataset substitutes the next readable index (``index + 1, index + 2, ...``) so batch sizes stay fixed;
the webdataset stream drops the sample. Each skip is one warning line naming the file (and line) and
is counted by reason in ``dataset.stats`` of the process that met it; samples carry their ``skipped``
records through DataLoader workers, so ``SkipStats.add_batch(batch)`` in the main process counts all
of them (the count ``dataset.stats`` gives with ``num_workers=0``). ``SkipStats.for_dataset(dataset,
max_fraction)`` adds the rows the listing skipped and enforces the skip-share limit.
"""
from __future__ import annotations

import json
import logging
import zlib
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from odecm.cli import InputError

from .data_images import (CROP_MODES, WHITE, ResizeCrop, UnsupportedImageError, bit_depth, decode_image, make_sample,
                          sample_generator, to_rgb8)
from .data_sampler import ShardedSampler
from .data_skips import (REASONS, Skip, SkipStats, TooManySkipsError, batch_skip_vector, skip)
from .data_sources import (CAPTION_KEYS, IMAGE_EXTENSIONS, INDEX_NAMES, METADATA_NAMES, PATH_KEYS, Listing, Record,
                           data_kind, expand_shards, iter_tar, list_folder, read_index, scan, sibling_key)
from .data_synthetic import CORRUPT_KINDS, make_synthetic_dataset, write_shards

__all__ = [
    "ImageCaptionDataset", "WebImageCaptionDataset", "collate", "open_dataset",
    "Record", "Listing", "scan", "list_folder", "read_index", "data_kind", "expand_shards", "iter_tar",
    "ResizeCrop", "decode_image", "to_rgb8", "bit_depth", "sample_generator", "UnsupportedImageError",
    "ShardedSampler", "Skip", "SkipStats", "TooManySkipsError", "REASONS", "batch_skip_vector",
    "make_synthetic_dataset", "write_shards", "CORRUPT_KINDS", "IMAGE_EXTENSIONS", "PATH_KEYS", "CAPTION_KEYS",
    "INDEX_NAMES", "METADATA_NAMES", "CROP_MODES", "WHITE",
]

log = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Map-style dataset over ``Record``s (from ``from_folder``: a folder or an index file).

    ``dataset[i]`` or ``dataset[(i, epoch)]`` (the form ``ShardedSampler(with_epoch=True)`` yields,
    which keeps random crops per-epoch with persistent workers). A bad file (``missing_image``,
    ``unreadable_image``) is skipped: the next index (mod len) is tried, up to ``max_skips`` times; the
    sample's ``index`` says which was used. ``listing_skips``: rows the listing skipped (counted once by
    ``SkipStats.for_dataset``); ``num_rows = len(records) + len(listing_skips)``.
    """

    def __init__(self, records: Sequence[Record], resolution: int = 1024, crop: str = "center",
                 flip: bool = False, seed: int = 0, max_skips: int = 64,
                 background: tuple[int, int, int] = WHITE, listing_skips: Sequence[Skip] = ()):
        if not records:
            raise ValueError("ImageCaptionDataset needs at least one record")
        self.records = list(records)
        self.transform = ResizeCrop(resolution, crop, flip, tuple(background))
        self.seed, self.epoch, self.max_skips = seed, 0, max_skips
        self.listing_skips = list(listing_skips)
        self.stats = SkipStats()
        self._bad: dict[int, Skip] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, index: str | Path | None = None, allow_empty_captions: bool = False,
                    key: str = "data.path", **kw) -> "ImageCaptionDataset":
        """Dataset of ``scan(folder, index, allow_empty_captions, key)`` (``key`` names the config key in errors)."""
        listing = scan(folder, index, allow_empty_captions, key)
        return cls(listing.records, listing_skips=listing.skips, **kw)

    @property
    def num_rows(self) -> int:
        return len(self.records) + len(self.listing_skips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def get_or_skip(self, index: int, epoch: int | None = None) -> dict | Skip:
        """Sample ``index`` without substitution, or its ``Skip`` if the file is bad (logged once,
        counted in ``stats`` each time)."""
        record = self.records[index]
        bad = self._bad.get(index)
        if bad is None:
            try:
                image = decode_image(record.path)
                rng = sample_generator(self.seed, self.epoch if epoch is None else epoch, index)
                sample = make_sample(self.transform, image, record.caption, rng, [])
            except FileNotFoundError as exc:
                bad = skip("missing_image", record.path, exc)
            except Exception as exc:  # PIL raises many types for broken files
                bad = skip("unreadable_image", record.path, exc)
            else:
                sample["index"] = index
                self.stats.delivered += 1
                return sample
            self._bad[index] = bad
        self.stats.add(bad)
        return bad

    def try_get(self, index: int, epoch: int | None = None) -> dict | None:
        """``get_or_skip`` with None for a bad file."""
        sample = self.get_or_skip(index, epoch)
        return None if isinstance(sample, Skip) else sample

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        skipped: list[Skip] = []
        for attempt in range(min(self.max_skips, len(self.records)) + 1):
            j = (int(index) + attempt) % len(self.records)
            sample = self.get_or_skip(j, epoch)
            if not isinstance(sample, Skip):
                sample["skipped"] = skipped
                return sample
            skipped.append(sample)
        raise RuntimeError(f"{len(skipped)} consecutive unreadable images from index {index}; check the data "
                           f"(first: {skipped[0].line()})")


class WebImageCaptionDataset(IterableDataset):
    """Iterable dataset over webdataset tar shards (image member with an extension in ``image_keys``,
    caption from ``.txt`` or from a caption key of ``.json``; tars read by ``iter_tar``).

    Order: the shard list is permuted by (seed, epoch) (``shuffle_shards``), split across processes
    (``shards[rank::world_size]``), then across DataLoader workers (``[worker::num_workers]``); samples
    come in tar order within a shard. Each rank sees disjoint shards, so use at least
    ``world_size * num_workers`` shards. ``set_epoch(epoch, start)`` skips the first ``start`` samples
    of each worker's stream (exact resume for ``num_workers=0``; with workers, each worker skips
    ``start // num_workers``); bad samples inside that skipped prefix are not counted again.
    A sample without a caption raises ``InputError`` unless ``allow_empty_captions``.
    """

    def __init__(self, shards: str | Sequence[str], resolution: int = 1024, crop: str = "center",
                 flip: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_shards: bool = True, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 background: tuple[int, int, int] = WHITE, allow_empty_captions: bool = False,
                 key: str = "data.path"):
        self.shards = expand_shards(shards, key)
        self.transform = ResizeCrop(resolution, crop, flip, tuple(background))
        self.seed, self.rank, self.world_size, self.shuffle_shards = seed, rank, world_size, shuffle_shards
        self.image_keys = tuple(image_keys)
        self.allow_empty_captions, self.key = allow_empty_captions, key
        self.epoch, self.start = 0, 0
        self.stats = SkipStats()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        shards = list(self.shards)
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards[self.rank::self.world_size][worker::num_workers]

    def caption(self, raw: dict, name: str) -> str | Skip:
        """The caption of a grouped tar sample, or a ``Skip`` (bad encoding, malformed .json)."""
        caption, where = None, name
        if "txt" in raw:
            where = f"{name}.txt"
            try:
                caption = raw["txt"].decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                return skip("bad_caption_encoding", where, exc)
        elif "json" in raw:
            where = f"{name}.json"
            try:
                meta = json.loads(raw["json"])
            except UnicodeDecodeError as exc:
                return skip("bad_caption_encoding", where, exc)
            except ValueError as exc:
                return skip("malformed_caption_json", where, exc)
            if not isinstance(meta, dict):
                return skip("malformed_caption_json", where, f"a JSON {type(meta).__name__}, not an object")
            column = next((k for k in CAPTION_KEYS if k in meta), None)
            caption = meta.get(column) if column else None
            if caption is not None and not isinstance(caption, str):
                return skip("malformed_caption_json", where, f"{column!r} holds a {type(caption).__name__}")
        caption = (caption or "").strip()
        if not caption and not self.allow_empty_captions:
            raise InputError(f"{self.key}: shard sample {where} has no caption (a .txt member, or a .json member "
                             f"with one of {list(CAPTION_KEYS)}); set {sibling_key(self.key, 'allow_empty_captions')}"
                             f"=true to use empty captions")
        return caption

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        to_skip = self.start // num_workers
        skipped: list[Skip] = []
        held = None

        def count(record: Skip) -> None:
            if to_skip == 0:  # a bad sample inside the resumed-over prefix was counted by the earlier run
                self.stats.add(record)
                skipped.append(record)

        for raw in chain.from_iterable(iter_tar(s) for s in self.shards_for(worker, num_workers)):
            if isinstance(raw, Skip):
                count(raw)
                continue
            name = f"{raw['__url__']}:{raw['__key__']}"
            image_key = next((k for k in self.image_keys if k in raw), None)
            if image_key is None:
                count(skip("missing_image", name, f"no member with extension {list(self.image_keys)}; "
                                                  f"members: {sorted(k for k in raw if not k.startswith('__'))}"))
                continue
            caption = self.caption(raw, name)
            if isinstance(caption, Skip):
                count(caption)
                continue
            try:
                image = decode_image(raw[image_key])
                rng = sample_generator(self.seed, self.epoch, zlib.crc32(raw["__key__"].encode()))
                sample = make_sample(self.transform, image, caption, rng, [])
            except Exception as exc:
                count(skip("unreadable_image", f"{name}.{image_key}", exc))
                continue
            if to_skip > 0:
                to_skip -= 1
                continue
            sample["key"], sample["skipped"] = raw["__key__"], skipped
            self.stats.delivered += 1
            skipped = []
            if held is not None:
                yield held
            held = sample  # held back one step so skips after the last good sample still reach a batch
        if held is not None:
            held["skipped"] = held["skipped"] + skipped
            yield held
        elif skipped:
            log.warning("%d bad samples and no readable one in this stream (worker %d); their counts are only in "
                        "this process's dataset.stats", len(skipped), worker)


def collate(samples: Sequence[dict]) -> dict:
    """Stack a list of samples: pixel_values (B, 3, R, R); original_size, crop_top_left, target_size
    (B, 2) long; caption list[str]; skipped = all ``Skip`` records (flattened); index/key lists."""
    batch = dict(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        caption=[s["caption"] for s in samples],
        original_size=torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        crop_top_left=torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        target_size=torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        skipped=[record for s in samples for record in s.get("skipped", [])],
    )
    for key in ("index", "key"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


def open_dataset(path: str, index: str | None = None, allow_empty_captions: bool = False, key: str = "data.path",
                 **kw) -> ImageCaptionDataset | WebImageCaptionDataset:
    """The dataset for a config's data path after the checks at the door (``InputError`` naming ``key``):
    tar shards -> ``WebImageCaptionDataset``, a folder or index file -> ``ImageCaptionDataset``.
    ``kw`` go to the dataset (resolution, crop, flip, seed, background, ...)."""
    if index is None and data_kind(path, key) == "shards":
        return WebImageCaptionDataset(path, allow_empty_captions=allow_empty_captions, key=key, **kw)
    return ImageCaptionDataset.from_folder(path, index, allow_empty_captions=allow_empty_captions, key=key, **kw)
