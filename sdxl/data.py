"""Image-caption data for SDXL distillation.

Sources
  * a local folder: images with a sidecar caption file (``cat.png`` + ``cat.txt``), or an index file
    (JSON lines or CSV) naming ``file`` and ``caption`` columns (accepted names in ``PATH_KEYS`` and
    ``CAPTION_KEYS``; paths are relative to the index file's folder) -> ``ImageCaptionDataset``;
  * webdataset tar shards: members ``<key>.jpg|png|...`` + ``<key>.txt`` or ``<key>.json`` (with a
    caption key) -> ``WebImageCaptionDataset``.

Transform (SDXL's micro-conditioning, as in the SDXL paper, section 2.2): the shorter side is resized to
``resolution`` (long side ``int(resolution * long / short)``), the image is optionally flipped, then
cropped to ``resolution x resolution`` (center, or uniform random). A sample is

    dict(pixel_values  (3, R, R) float32 in [-1, 1],
         caption       str,
         original_size (h, w) of the file before resizing,
         crop_top_left (top, left) of the crop in the resized (and flipped) image,
         target_size   (R, R),
         index / key, skipped)

so that ``time_ids = original_size + crop_top_left + target_size`` (6 numbers; after ``collate``:
``sdxl.teacher.make_time_ids(B, batch["original_size"], batch["crop_top_left"], batch["target_size"])``).

Randomness. Random crops and flips draw from a generator seeded by ``(seed, epoch, index)`` (webdataset:
``(seed, epoch, crc32(key))``), so a sample's augmentation does not depend on worker count or order.

Unreadable files are skipped, never raised: the map-style dataset substitutes the next readable index
(``index + 1, index + 2, ...``) so batch sizes stay fixed; the webdataset stream drops the sample. Each
skip is logged (``logging.warning``) and counted in the dataset's ``stats`` (a ``SkipStats``) of the
process that decoded it. DataLoader workers hold copies of the dataset, so their counts never reach the
main process's ``dataset.stats``; instead every sample carries the ``skipped`` file names it stepped
over, ``collate`` concatenates them into ``batch["skipped"]``, and ``SkipStats.add_batch(batch)`` in
the main process gives the total over all workers (the count that ``dataset.stats`` gives when
``num_workers=0``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PATH_KEYS = ("file", "image", "path", "file_name", "filename", "image_path", "img")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")
INDEX_NAMES = ("metadata.jsonl", "index.jsonl", "metadata.csv", "index.csv")
CROP_MODES = ("center", "random")


@dataclass(frozen=True)
class Record:
    """One image file and its caption."""

    path: str
    caption: str


@dataclass
class SkipStats:
    """Count of unreadable samples. ``count`` = skip events, ``files`` = distinct names (first 1000)."""

    count: int = 0
    files: list = field(default_factory=list)

    def add(self, name: str, reason: str = "") -> None:
        self.count += 1
        if name not in self.files and len(self.files) < 1000:
            self.files.append(name)

    def add_batch(self, batch: dict) -> None:
        """Accumulate the ``skipped`` names that a collated batch carries (works with any num_workers)."""
        for name in batch.get("skipped", []):
            self.add(name)


# ----------------------------------------------------------------------------------------------------
# listing


def _pick(row: dict, keys: Sequence[str], what: str, source: Path) -> str:
    for key in keys:
        if key in row and row[key] is not None:
            return str(row[key])
    raise KeyError(f"{source}: no {what} column; accepted names are {list(keys)}, got {list(row)}")


def read_index(index_file: str | Path) -> list[Record]:
    """Records from a JSON-lines or CSV index; relative paths resolve against the index's folder."""
    index_file = Path(index_file)
    if index_file.suffix == ".jsonl":
        rows = [json.loads(line) for line in index_file.read_text().splitlines() if line.strip()]
    elif index_file.suffix == ".csv":
        with index_file.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"index file {index_file}: suffix must be .jsonl or .csv")
    records = []
    for row in rows:
        path = Path(_pick(row, PATH_KEYS, "image path", index_file))
        if not path.is_absolute():
            path = index_file.parent / path
        records.append(Record(str(path), _pick(row, CAPTION_KEYS, "caption", index_file)))
    return records


def list_folder(folder: str | Path, index: str | Path | None = None) -> list[Record]:
    """Records of a folder: from ``index`` if given, else from an index file named one of
    ``INDEX_NAMES`` in the folder, else every image (recursively, sorted) with its sidecar ``.txt``
    (missing sidecar -> empty caption, with a warning)."""
    folder = Path(folder)
    if index is not None:
        return read_index(index)
    for name in INDEX_NAMES:
        if (folder / name).is_file():
            return read_index(folder / name)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    records, missing = [], 0
    for image in images:
        sidecar = image.with_suffix(".txt")
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        else:
            caption, missing = "", missing + 1
        records.append(Record(str(image), caption))
    if missing:
        log.warning("%d of %d images in %s have no caption file; using empty captions", missing, len(images), folder)
    if not records:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or index file under {folder}")
    return records


# ----------------------------------------------------------------------------------------------------
# transform


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation, a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


@dataclass(frozen=True)
class ResizeCrop:
    """Resize the shorter side to ``resolution``, optional horizontal flip (p = 0.5), crop to a square.

    Returns ``(pixel_values, original_size, crop_top_left)``: pixels (3, R, R) in [-1, 1] (x / 127.5 - 1),
    original (h, w) before resizing, and (top, left) of the crop in the resized, flipped image.
    Center crop: ``top = round((H - R) / 2)``, ``left = round((W - R) / 2)``; random crop: uniform
    integers in ``[0, H - R]`` and ``[0, W - R]``.
    """

    resolution: int = 1024
    crop: str = "center"
    flip: bool = False

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop={self.crop!r}; allowed values: {list(CROP_MODES)}")
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution}; must be >= 8")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        res = self.resolution
        if height <= width:
            return res, max(res, int(res * width / height))
        return max(res, int(res * height / width)), res

    def __call__(self, image: Image.Image, rng: np.random.Generator):
        image = image.convert("RGB")
        original = (image.height, image.width)
        new_h, new_w = self.resized_size(*original)
        if (new_h, new_w) != original:
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        res = self.resolution
        if self.crop == "center":
            top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
        else:
            top, left = int(rng.integers(0, new_h - res + 1)), int(rng.integers(0, new_w - res + 1))
        image = image.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return pixels / 127.5 - 1.0, original, (top, left)


def _decode(data: bytes | str | Path) -> Image.Image:
    """Open and fully decode an image (so truncated files fail here, not later)."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image


def _make_sample(transform: ResizeCrop, image: Image.Image, caption: str, rng, skipped: list) -> dict:
    pixels, original, crop = transform(image, rng)
    return dict(
        pixel_values=pixels,
        caption=caption,
        original_size=original,
        crop_top_left=crop,
        target_size=(transform.resolution, transform.resolution),
        skipped=skipped,
    )


# ----------------------------------------------------------------------------------------------------
# datasets


class ImageCaptionDataset(Dataset):
    """Map-style dataset over ``Record``s (a folder with sidecar captions or an index file).

    ``dataset[i]`` or ``dataset[(i, epoch)]`` (the form ``ShardedSampler(with_epoch=True)`` yields,
    which keeps random crops per-epoch with persistent workers). An unreadable file is skipped: the
    next index (mod len) is tried, up to ``max_skips`` times; the sample's ``index`` says which was used.
    """

    def __init__(self, records: Sequence[Record], resolution: int = 1024, crop: str = "center",
                 flip: bool = False, seed: int = 0, max_skips: int = 64):
        if not records:
            raise ValueError("ImageCaptionDataset needs at least one record")
        self.records = list(records)
        self.transform = ResizeCrop(resolution, crop, flip)
        self.seed, self.epoch, self.max_skips = seed, 0, max_skips
        self.stats = SkipStats()
        self._bad: set[int] = set()

    @classmethod
    def from_folder(cls, folder: str | Path, index: str | Path | None = None, **kw) -> "ImageCaptionDataset":
        return cls(list_folder(folder, index), **kw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def try_get(self, index: int, epoch: int | None = None) -> dict | None:
        """Sample ``index`` without substitution: None (logged, counted) if its file is unreadable."""
        record = self.records[index]
        if index not in self._bad:
            try:
                image = _decode(record.path)
            except Exception as exc:  # PIL raises many types for broken files
                self._bad.add(index)
                log.warning("skipping unreadable image %s (%s: %s)", record.path, type(exc).__name__, exc)
            else:
                rng = sample_generator(self.seed, self.epoch if epoch is None else epoch, index)
                sample = _make_sample(self.transform, image, record.caption, rng, [])
                sample["index"] = index
                return sample
        self.stats.add(record.path)
        return None

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        skipped = []
        for attempt in range(min(self.max_skips, len(self.records)) + 1):
            j = (int(index) + attempt) % len(self.records)
            sample = self.try_get(j, epoch)
            if sample is not None:
                sample["skipped"] = skipped
                return sample
            skipped.append(self.records[j].path)
        raise RuntimeError(f"{len(skipped)} consecutive unreadable images from index {index}; "
                           f"check the data (first: {skipped[:3]})")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern (``data-{000..009}.tar``), a directory, or a list."""
    if isinstance(shards, (list, tuple)):
        return [str(s) for s in shards]
    if Path(shards).is_dir():
        return sorted(str(p) for p in Path(shards).glob("*.tar"))
    import braceexpand

    return list(braceexpand.braceexpand(shards))


class WebImageCaptionDataset(IterableDataset):
    """Iterable dataset over webdataset tar shards (image key in ``image_keys``, caption from ``.txt``
    or from a caption key of ``.json``).

    Order: the shard list is permuted by (seed, epoch) (``shuffle_shards``), split across processes
    (``shards[rank::world_size]``), then across DataLoader workers (``[worker::num_workers]``); samples
    come in tar order within a shard. Each rank sees disjoint shards, so use at least
    ``world_size * num_workers`` shards. ``set_epoch(epoch, start)`` skips the first ``start`` samples
    of each worker's stream (exact resume for ``num_workers=0``; with workers, each worker skips
    ``start // num_workers``).
    """

    def __init__(self, shards: str | Sequence[str], resolution: int = 1024, crop: str = "center",
                 flip: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_shards: bool = True, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp")):
        self.shards = expand_shards(shards)
        if not self.shards:
            raise FileNotFoundError(f"no tar shards in {shards!r}")
        self.transform = ResizeCrop(resolution, crop, flip)
        self.seed, self.rank, self.world_size, self.shuffle_shards = seed, rank, world_size, shuffle_shards
        self.image_keys = tuple(image_keys)
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

    def _caption(self, raw: dict) -> str:
        if "txt" in raw:
            return raw["txt"].decode("utf-8").strip()
        if "json" in raw:
            meta = json.loads(raw["json"])
            for key in CAPTION_KEYS:
                if key in meta:
                    return str(meta[key])
        return ""

    def __iter__(self) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = self.shards_for(worker, num_workers)
        to_skip = self.start // num_workers
        skipped: list[str] = []
        held = None

        def on_error(exc: Exception) -> bool:  # unreadable tar member or shard: count and go on
            name = str(exc.args[-1]) if exc.args else "?"
            log.warning("skipping unreadable webdataset entry %s (%s)", name, exc)
            self.stats.add(name)
            skipped.append(name)
            return True

        for raw in tarfile_samples([dict(url=s) for s in shards], handler=on_error):
            name = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            image_key = next((k for k in self.image_keys if k in raw), None)
            try:
                if image_key is None:
                    raise ValueError(f"no image member among {self.image_keys}")
                image = _decode(raw[image_key])
                caption = self._caption(raw)
            except Exception as exc:
                log.warning("skipping unreadable image %s (%s: %s)", name, type(exc).__name__, exc)
                self.stats.add(name)
                skipped.append(name)
                continue
            if to_skip > 0:
                to_skip -= 1
                continue
            rng = sample_generator(self.seed, self.epoch, zlib.crc32(raw["__key__"].encode()))
            sample = _make_sample(self.transform, image, caption, rng, skipped)
            sample["key"] = raw["__key__"]
            skipped = []
            if held is not None:
                yield held
            held = sample  # held back one step so skips after the last good sample still reach a batch
        if held is not None:
            held["skipped"] = held["skipped"] + skipped
            yield held
        elif skipped:
            log.warning("%d unreadable samples and no readable one in this stream", len(skipped))


# ----------------------------------------------------------------------------------------------------
# batching and order


def collate(samples: Sequence[dict]) -> dict:
    """Stack a list of samples: pixel_values (B, 3, R, R); original_size, crop_top_left, target_size
    (B, 2) long; caption list[str]; skipped = all skipped names (flattened); index/key lists."""
    batch = dict(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        caption=[s["caption"] for s in samples],
        original_size=torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        crop_top_left=torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        target_size=torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
        skipped=[name for s in samples for name in s.get("skipped", [])],
    )
    for key in ("index", "key"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


class ShardedSampler(Sampler):
    """Deterministic, resumable, process-sharded order for a map-style dataset.

    Epoch ``e``'s order is ``randperm(num_samples)`` from a generator seeded by (seed, e) (identity when
    ``shuffle=False``). It is padded by wrapping around to a multiple of ``world_size`` (or truncated if
    ``drop_last``), and rank ``r`` takes positions ``r, r + world_size, ...``: ranks are disjoint (up to
    the wrapped padding) and together cover every index. Iteration starts at position ``start`` of this
    rank's list (``set_epoch(e, start)`` or ``resume(step, batch_size)``). Use one sampler per process
    (rank = ``accelerator.process_index``, world_size = ``accelerator.num_processes``) and do not pass
    the DataLoader through ``accelerator.prepare`` (which would shard a second time).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, with_epoch: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size, self.drop_last, self.with_epoch = rank, world_size, drop_last, with_epoch
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        """Indices per rank per epoch."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch]).generate_state(1)[0]))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def rank_indices(self, epoch: int) -> list[int]:
        order = self.permutation(epoch)
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank::self.world_size]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def resume(self, step: int, batch_size: int, drop_last_batch: bool = True) -> None:
        """Position after ``step`` optimizer steps of ``batch_size`` samples per rank (DataLoader
        ``drop_last=drop_last_batch``): epoch = step // batches_per_epoch, start = rest * batch_size."""
        per_epoch = self.per_rank // batch_size if drop_last_batch else math.ceil(self.per_rank / batch_size)
        if per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.per_rank} samples per rank")
        self.set_epoch(step // per_epoch, (step % per_epoch) * batch_size)

    def __iter__(self) -> Iterator:
        for index in self.rank_indices(self.epoch)[self.start:]:
            yield (index, self.epoch) if self.with_epoch else index

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


# ----------------------------------------------------------------------------------------------------
# synthetic data for tests and benchmarks

_COLOURS = dict(red=(220, 40, 40), green=(40, 180, 60), blue=(40, 70, 220), yellow=(230, 210, 40),
                purple=(140, 50, 170), orange=(240, 140, 30), white=(245, 245, 245), black=(15, 15, 15))
CORRUPT_KINDS = ("truncated", "not_image", "empty")


def _synthetic_image(rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, str]:
    names = list(_COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = _COLOURS[names[bg]]
    h, w = int(rng.integers(height // 4, height // 2 + 1)), int(rng.integers(width // 4, width // 2 + 1))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    pixels[top:top + h, left:left + w] = _COLOURS[names[fg]]
    noise = rng.integers(-12, 13, size=pixels.shape)
    pixels = np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), f"a {names[fg]} rectangle on a {names[bg]} background"


def _corrupt_bytes(kind: str, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # a valid PNG header and the first part of the data
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        return data[: len(data) // 2]
    if kind == "not_image":
        return b"this is a text file, not an image\n" * 4
    return b""


def make_synthetic_dataset(folder: str | Path, n: int, size: int | tuple[int, int] | Sequence = 64,
                           seed: int = 0, corrupt: int = 0, index: str = "txt") -> list[Record]:
    """Write ``n`` PNGs with captions (+ ``corrupt`` unreadable files that have captions too) to ``folder``.

    ``size``: int (square), (h, w), or a list of those cycled over images. ``index``: "txt" (sidecar
    files), "jsonl" (``metadata.jsonl`` with file/caption keys) or "csv" (``metadata.csv`` with
    image/text columns). Corrupt files cycle through ``CORRUPT_KINDS`` (truncated PNG, text named .png,
    empty file) and sit at evenly spaced positions in sorted order. Returns the good records in order.
    """
    if index not in ("txt", "jsonl", "csv"):
        raise ValueError(f"index={index!r}; allowed values: ['txt', 'jsonl', 'csv']")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [size] if isinstance(size, int) or (isinstance(size, tuple) and isinstance(size[0], int)) else list(size)
    total = n + corrupt
    bad_positions = {int(p) for p in np.linspace(1, total - 1, corrupt)} if corrupt else set()
    while len(bad_positions) < corrupt:  # only for tiny totals where linspace collides
        bad_positions.add(max(set(range(total)) - bad_positions))
    rows, good, bad_count = [], [], 0
    for position in range(total):
        if position in bad_positions:
            kind = CORRUPT_KINDS[bad_count % len(CORRUPT_KINDS)]
            bad_count += 1
            path = folder / f"img_{position:05d}.png"
            path.write_bytes(_corrupt_bytes(kind, rng))
            caption = f"corrupt file ({kind})"
        else:
            shape = sizes[len(good) % len(sizes)]
            height, width = (shape, shape) if isinstance(shape, int) else shape
            image, caption = _synthetic_image(rng, height, width)
            path = folder / f"img_{position:05d}.png"
            image.save(path)
            good.append(Record(str(path), caption))
        rows.append(dict(file=path.name, caption=caption))
        if index == "txt":
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if index == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif index == "csv":
        with (folder / "metadata.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "text"])
            writer.writeheader()
            writer.writerows(dict(image=r["file"], text=r["caption"]) for r in rows)
    return good


def write_shards(records: Iterable[Record], folder: str | Path, per_shard: int = 8,
                 caption_as: str = "txt") -> list[str]:
    """Pack records into webdataset tars ``folder/shard-00000.tar`` ... (members ``<key>.<ext>`` and
    ``<key>.txt`` or ``<key>.json`` = {"caption": ...}); the file bytes are copied as they are, so
    corrupt files stay corrupt. Returns the shard paths."""
    if caption_as not in ("txt", "json"):
        raise ValueError(f"caption_as={caption_as!r}; allowed values: ['txt', 'json']")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = list(records)
    paths = []
    for shard_no, first in enumerate(range(0, len(records), per_shard)):
        path = folder / f"shard-{shard_no:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for offset, record in enumerate(records[first:first + per_shard]):
                key = f"{first + offset:08d}"
                image_ext = Path(record.path).suffix.lower().lstrip(".") or "png"
                text = (record.caption if caption_as == "txt" else json.dumps(dict(caption=record.caption)))
                for name, data in ((f"{key}.{image_ext}", Path(record.path).read_bytes()),
                                   (f"{key}.{caption_as}", text.encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths
