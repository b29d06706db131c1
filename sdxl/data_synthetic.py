"""Synthetic captioned images (with optional unreadable files) and tar shard packing, for tests and benchmarks."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .data_sources import Record

_COLOURS = dict(red=(220, 40, 40), green=(40, 180, 60), blue=(40, 70, 220), yellow=(230, 210, 40),
                purple=(140, 50, 170), orange=(240, 140, 30), white=(245, 245, 245), black=(15, 15, 15))
CORRUPT_KINDS = ("truncated", "not_image", "empty")
INDEX_LAYOUTS = ("txt", "jsonl", "csv", "imagefolder")


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
    files), "jsonl" (``metadata.jsonl`` with file/caption keys), "csv" (``metadata.csv`` with
    image/text columns) or "imagefolder" (HuggingFace layout: images in ``part-0/``, ``part-1/``, each
    with a ``metadata.jsonl`` of file_name/text keys). Corrupt files cycle through ``CORRUPT_KINDS``
    (truncated PNG, text named .png, empty file) and sit at evenly spaced positions in sorted order.
    Returns the good records in order.
    """
    if index not in INDEX_LAYOUTS:
        raise ValueError(f"index={index!r}; allowed values: {list(INDEX_LAYOUTS)}")
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
            path = _image_path(folder, position, total, index)
            path.write_bytes(_corrupt_bytes(kind, rng))
            caption = f"corrupt file ({kind})"
        else:
            shape = sizes[len(good) % len(sizes)]
            height, width = (shape, shape) if isinstance(shape, int) else shape
            image, caption = _synthetic_image(rng, height, width)
            path = _image_path(folder, position, total, index)
            image.save(path)
            good.append(Record(str(path), caption))
        rows.append(dict(file=path.name, caption=caption, part=path.parent))
        if index == "txt":
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if index == "jsonl":
        lines = [json.dumps(dict(file=r["file"], caption=r["caption"])) + "\n" for r in rows]
        (folder / "metadata.jsonl").write_text("".join(lines))
    elif index == "csv":
        with (folder / "metadata.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["image", "text"])
            writer.writeheader()
            writer.writerows(dict(image=r["file"], text=r["caption"]) for r in rows)
    elif index == "imagefolder":
        for part in sorted({r["part"] for r in rows}):
            (part / "metadata.jsonl").write_text("".join(json.dumps(dict(file_name=r["file"], text=r["caption"])) + "\n"
                                                         for r in rows if r["part"] == part))
    return good


def _image_path(folder: Path, position: int, total: int, index: str) -> Path:
    if index != "imagefolder":
        return folder / f"img_{position:05d}.png"
    part = folder / f"part-{2 * position // total}"  # two parts, in order
    part.mkdir(exist_ok=True)
    return part / f"img_{position:05d}.png"


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
