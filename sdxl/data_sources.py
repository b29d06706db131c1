"""Where image-caption data comes from: folders, index / metadata files, tar shards; the checks at the door.

Layouts read by ``scan`` (a folder or an index file; see ``docs/sdxl_data.md``):

* an index file (``.jsonl``: one JSON object a line; ``.csv``: a header line) with an image-path column
  (``PATH_KEYS``) and a caption column (``CAPTION_KEYS``), matched case-insensitively; relative paths
  resolve against the index file's folder;
* a folder, read recursively: every metadata file named in ``METADATA_NAMES`` anywhere under it (the
  HuggingFace ``imagefolder`` layout: ``root/part-0/metadata.jsonl`` naming ``file_name`` relative to
  its own folder, caption in ``text`` / ``caption`` / ...), and for images in folders that no metadata
  file governs (neither their folder nor an ancestor under the root holds one), a sidecar caption file
  ``cat.png`` + ``cat.txt``. Images in a governed folder that no metadata row names are not used (one
  warning counts them).

A caption that is missing or empty is an error for the whole run (``InputError`` naming the file and,
for index files, the line), unless ``allow_empty_captions``. A bad row (malformed line, caption that
is not UTF-8, no image path) is a ``Skip`` (``sdxl.data_skips``), not an error.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from odecm.cli import InputError

from .data_skips import Skip, skip

log = logging.getLogger("sdxl.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PATH_KEYS = ("file", "image", "path", "file_name", "filename", "image_path", "img")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")
METADATA_NAMES = ("metadata.jsonl", "index.jsonl", "metadata.csv", "index.csv")
INDEX_NAMES = METADATA_NAMES  # the name before the split
INDEX_SUFFIXES = (".jsonl", ".csv")
SHARD_SUFFIX = ".tar"
ALLOWED_DATA = "a folder, an index file (.jsonl, .csv), a .tar shard, a folder of .tar shards or a brace pattern"


@dataclass(frozen=True)
class Record:
    """One image file and its caption."""

    path: str
    caption: str


@dataclass
class Listing:
    """What ``scan`` found: ``records`` (usable rows), ``skips`` (bad rows), ``missing_captions``
    (where each caption-less image was named), ``sources`` (files the captions came from)."""

    records: list[Record] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.records) + len(self.skips)


def sibling_key(key: str, name: str) -> str:
    """The config key ``name`` next to ``key``: ``("data.path", "index") -> "data.index"``,
    ``("data", "index") -> "index"``."""
    return f"{key.rpartition('.')[0]}.{name}" if "." in key else name


# ----------------------------------------------------------------------------------------------------
# index files


def _field(row: dict, keys: Sequence[str]):
    """(column, value) of the first of ``keys`` in ``row`` (exact name first, then case-insensitive)."""
    for name in keys:
        if name in row:
            return name, row[name]
    lower = {str(k).lower(): k for k in row}
    for name in keys:
        if name in lower:
            return lower[name], row[lower[name]]
    return None, None


def _not_utf8(text: str) -> bool:
    """True if ``text`` holds surrogate escapes (bytes that were not valid UTF-8)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def index_rows(index_file: Path) -> Iterator[tuple[int, dict | Skip]]:
    """``(line, row)`` of a ``.jsonl`` or ``.csv`` index, or ``(line, Skip)`` for a line that is not a
    row (invalid JSON, not an object, wrong number of CSV fields). Bytes that are not UTF-8 come
    through as surrogate escapes, for the caller to judge by column. Blank lines are ignored."""
    name = str(index_file)
    if index_file.suffix == ".jsonl":
        with index_file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, skip("malformed_index_line", f"{name}:{line_no}", f"invalid JSON ({exc})")
                    continue
                if not isinstance(row, dict):
                    yield line_no, skip("malformed_index_line", f"{name}:{line_no}",
                                        f"a JSON {type(row).__name__}, not an object")
                    continue
                yield line_no, row
        return
    with index_file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, skip("malformed_index_line", f"{name}:{start}", exc)
                continue
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield start, skip("malformed_index_line", f"{name}:{start}",
                                  f"{len(values)} fields, the header has {len(header)}")
                continue
            yield start, dict(zip(header, values))


def _read_index_into(index_file: Path, listing: Listing) -> None:
    """Append ``index_file``'s rows to ``listing`` (records, skips, missing captions)."""
    listing.sources.append(str(index_file))
    for line_no, row in index_rows(index_file):
        where = f"{index_file}:{line_no}"
        if isinstance(row, Skip):
            listing.skips.append(row)
            continue
        _, path = _field(row, PATH_KEYS)
        if not isinstance(path, str) or not path.strip():
            listing.skips.append(skip("malformed_index_line", where,
                                      f"no image path (accepted keys {list(PATH_KEYS)}; row keys {list(row)})"))
            continue
        if _not_utf8(path):
            listing.skips.append(skip("malformed_index_line", where, "the image path is not valid UTF-8"))
            continue
        column, caption = _field(row, CAPTION_KEYS)
        if caption is not None and not isinstance(caption, str):
            listing.skips.append(skip("malformed_index_line", where,
                                      f"caption column {column!r} holds a {type(caption).__name__}, not a string"))
            continue
        if caption is not None and _not_utf8(caption):
            listing.skips.append(skip("bad_caption_encoding", where, f"column {column!r} is not valid UTF-8"))
            continue
        image = Path(path.strip())
        if not image.is_absolute():
            image = index_file.parent / image
        caption = (caption or "").strip()
        if not caption:
            listing.missing_captions.append(
                f"{where} ({path.strip()}; " + (f"empty {column!r}" if column else f"row keys {list(row)}") + ")")
        listing.records.append(Record(os.path.normpath(image), caption))


def read_index(index_file: str | Path, allow_empty_captions: bool = False, key: str = "data.index") -> list[Record]:
    """Records of one ``.jsonl`` / ``.csv`` index (bad rows skipped with a warning; see ``scan``)."""
    return scan(index_file, allow_empty_captions=allow_empty_captions, key=key).records


# ----------------------------------------------------------------------------------------------------
# folders


def _walk_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        files += [Path(folder) / name for name in names]
    return sorted(files, key=lambda p: p.parts)


def _sidecar_caption(image: Path, listing: Listing) -> str | None:
    """The caption in ``image``'s ``.txt`` ('' if the file is missing or empty, noted in
    ``listing.missing_captions``; None, with a Skip, if it is not UTF-8)."""
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        listing.missing_captions.append(f"{image} (no {sidecar.name})")
        return ""
    try:
        caption = sidecar.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        listing.skips.append(skip("bad_caption_encoding", str(sidecar), exc))
        return None
    if not caption:
        listing.missing_captions.append(f"{image} ({sidecar.name} is empty)")
    return caption


def _scan_folder(root: Path, listing: Listing, key: str) -> None:
    files = _walk_files(root)
    metadata = [p for p in files if p.name in METADATA_NAMES]
    parquet = [p for p in files if p.name == "metadata.parquet"]
    if parquet:
        raise InputError(f"{key}={str(root)!r}: {parquet[0]} is a parquet metadata file; allowed metadata "
                         f"files: {list(METADATA_NAMES)} (convert it to metadata.jsonl or metadata.csv)")
    by_folder: dict[Path, list[Path]] = {}
    for m in metadata:
        by_folder.setdefault(m.parent, []).append(m)
    for folder, names in by_folder.items():
        if len(names) > 1:
            raise InputError(f"{key}={str(root)!r}: {folder} holds {len(names)} metadata files "
                             f"({', '.join(n.name for n in names)}); keep one")
    for m in metadata:
        _read_index_into(m, listing)
    named = {os.path.abspath(r.path) for r in listing.records}
    governed = set(by_folder)
    unlisted, sidecars = [], False
    for image in (p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS):
        if any(parent in governed for parent in image.parents):
            if os.path.abspath(image) not in named:
                unlisted.append(image)
            continue
        sidecars = True
        caption = _sidecar_caption(image, listing)
        if caption is not None:
            listing.records.append(Record(str(image), caption))
    if sidecars:
        listing.sources.append(f"{root} (sidecar .txt captions)")
    if unlisted:
        log.warning("%d images under %s are not named by their folder's metadata file and are not used (e.g. %s)",
                    len(unlisted), root, unlisted[0])


def scan(path: str | Path, index: str | Path | None = None, allow_empty_captions: bool = False,
         key: str = "data.path") -> Listing:
    """List a folder (recursively) or an index file; ``index`` (an index file) replaces ``path``'s own
    listing. Errors (``InputError``, naming ``key`` or its ``index`` / ``allow_empty_captions``
    siblings): a path that does not exist, an unknown extension, nothing usable, missing captions."""
    index_key = sibling_key(key, "index")
    listing = Listing()
    if index is not None:
        source, source_key = Path(index), index_key
        _check_index_file(source, index_key)
        _read_index_into(source, listing)
    else:
        source, source_key = Path(path), key
        if not source.exists():
            raise InputError(f"{key}={str(path)!r}: no such file or folder")
        if source.is_file():
            _check_index_file(source, key)
            _read_index_into(source, listing)
        else:
            _scan_folder(source, listing, key)
    if not listing.records:
        bad = f" ({len(listing.skips)} bad rows, first: {listing.skips[0].line()})" if listing.skips else ""
        what = "no usable rows" if listing.sources and source.is_file() else (
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) or metadata files ({', '.join(METADATA_NAMES)})")
        raise InputError(f"{source_key}={str(source)!r}: {what}{bad}")
    if listing.missing_captions and not allow_empty_captions:
        n = len(listing.missing_captions)
        raise InputError(
            f"{source_key}={str(source)!r}: {n} of {len(listing.records)} images have no caption (first: "
            f"{listing.missing_captions[0]}); captions come from a column named one of {list(CAPTION_KEYS)} of a "
            f"metadata / index file or from a .txt next to the image; set "
            f"{sibling_key(key, 'allow_empty_captions')}=true to use empty captions")
    if listing.missing_captions:
        log.warning("%d of %d images have no caption; using empty captions (allow_empty_captions)",
                    len(listing.missing_captions), len(listing.records))
    probe = listing.records[:16]
    if not any(os.path.exists(r.path) for r in probe):
        raise InputError(f"{source_key}={str(source)!r}: none of the first {len(probe)} images it names exist "
                         f"(e.g. {probe[0].path}); relative paths are relative to the index file's folder")
    return listing


def list_folder(folder: str | Path, index: str | Path | None = None, allow_empty_captions: bool = False,
                key: str = "data.path") -> list[Record]:
    """Records of a folder or index file (``scan(...).records``)."""
    return scan(folder, index, allow_empty_captions, key).records


def _check_index_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise InputError(f"{key}={str(path)!r}: no such file")
    if path.suffix not in INDEX_SUFFIXES:
        raise InputError(f"{key}={str(path)!r}: unknown file extension {path.suffix!r}; allowed: "
                         f"{list(INDEX_SUFFIXES)}")


# ----------------------------------------------------------------------------------------------------
# checks at the door and shards


def data_kind(path: str, key: str = "data.path") -> str:
    """``"folder"``, ``"index"`` or ``"shards"`` for a data path, or an ``InputError`` naming ``key``
    (missing path or shard, unknown extension). Reads no image."""
    if not path:
        raise InputError(f"{key}: empty; allowed: {ALLOWED_DATA}")
    if "{" in path:
        expand_shards(path, key)
        return "shards"
    p = Path(path)
    if not p.exists():
        raise InputError(f"{key}={path!r}: no such file or folder")
    if p.is_file():
        if p.suffix in INDEX_SUFFIXES:
            return "index"
        if p.suffix == SHARD_SUFFIX:
            return "shards"
        raise InputError(f"{key}={path!r}: unknown file extension {p.suffix!r}; allowed: {ALLOWED_DATA}")
    entries = list(p.iterdir())
    has_tars = any(e.suffix == SHARD_SUFFIX and e.is_file() for e in entries)
    has_other = any(e.suffix.lower() in IMAGE_EXTENSIONS or e.name in METADATA_NAMES for e in entries)
    return "shards" if has_tars and not has_other else "folder"


def expand_shards(shards: str | Sequence[str], key: str = "data.path") -> list[str]:
    """Shard list from a brace pattern (``data-{000..009}.tar``), a ``.tar`` file, a folder of them or a
    list; every shard must exist (``InputError`` naming ``key`` otherwise)."""
    if isinstance(shards, (list, tuple)):
        found = [str(s) for s in shards]
    elif Path(shards).is_dir():
        found = sorted(str(p) for p in Path(shards).glob("*" + SHARD_SUFFIX))
    elif "{" in shards:
        import braceexpand

        found = list(braceexpand.braceexpand(shards))
    else:
        found = [str(shards)]
    if not found:
        raise InputError(f"{key}={shards!r}: no {SHARD_SUFFIX} shards")
    missing = [s for s in found if not os.path.isfile(s)]
    if missing:
        raise InputError(f"{key}={shards!r}: {len(missing)} of {len(found)} shards do not exist (first: {missing[0]})")
    return found


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's convention: key = up to the first dot


def _tail_problem(fh, offset: int) -> str:
    """Why the bytes after the last member are not a proper end of archive ('' if they are)."""
    size = fh.seek(0, os.SEEK_END)
    remaining = size - offset
    if remaining < 512:
        return f"ends {remaining} bytes after the last member, without the end-of-archive blocks"
    for start in (offset, max(offset, size - 65536)):
        fh.seek(start)
        if fh.read(65536).strip(b"\0"):
            return f"unreadable data at byte {offset} (a damaged or cut member header)"
    return ""


def iter_tar(shard: str) -> Iterator[dict | Skip]:
    """Samples of one tar shard in member order: ``{"__key__", "__url__", ext: bytes, ...}`` (members
    grouped by key, ext lower-cased), or a ``Skip``: the whole shard (``unreadable_shard``) or the sample
    cut off by a truncation or a damaged header (``truncated_shard``, counted once; samples after the
    cut cannot be counted)."""
    try:
        fh = open(shard, "rb")
    except OSError as exc:
        yield skip("unreadable_shard", shard, exc)
        return
    with fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield skip("unreadable_shard", shard, exc)
            return
        group, key = None, None
        try:
            while (info := tar.next()) is not None:
                match = _MEMBER.match(info.name)
                if not info.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if group is not None and key != group["__key__"]:
                    yield group
                    group = None
                data = tar.extractfile(info).read()
                group = group or {"__key__": key, "__url__": shard}
                group[ext] = data
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield skip("truncated_shard", f"{shard}:{key}" if key else shard, exc)
            return
        problem = _tail_problem(fh, tar.offset)
        if problem:  # the last group may have lost members (its caption, say): drop it
            yield skip("truncated_shard", f"{shard}:{group['__key__']}" if group else shard, problem)
        elif group is not None:
            yield group
