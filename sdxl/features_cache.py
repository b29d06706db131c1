"""Plumbing shared by the SDXL feature extractors: image sets, content hashes, the feature cache, sharding, Fréchet distance.

* ``ImageSet``: an ordered list of image files; ``fingerprint()`` hashes names and bytes (plus the
  load options), so cached features follow the files' content. ``jpeg_quality`` passes every image
  through a PIL JPEG encode/decode first (the paper wrote its samples as ``.jpg``, PIL's default
  quality 75, before dgm-eval read them).
* ``file_digest`` / ``weights_fingerprint``: BLAKE2b of file contents, remembered per
  ``(path, size, mtime_ns)`` in the JSON file ``<odecm cache>/file_digests.json`` so multi-GB weights are
  hashed once.
* ``extract_features``: features of an image set, cached in ``<cache_dir>/<extractor>-<hash>.safetensors``
  and, under ``accelerate launch``, computed in contiguous shards per process and gathered in order.
* ``frechet_distance`` and ``fd_sample_note`` (a warning when ``n <= d`` leaves the covariance
  estimate rank-deficient).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from odecm.atomic import atomic_path, write_json_atomic

Tensor = torch.Tensor

__all__ = ["MissingWeights", "ImageSet", "IMAGE_EXTS", "load_images", "save_images", "jpeg_roundtrip",
           "FeatureExtractor", "file_digest", "default_digest_cache", "weights_fingerprint", "cached", "extract_features",
           "extract_text_features", "frechet_distance", "fd_sample_note"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class MissingWeights(RuntimeError):
    """Weights for a metric are not available; the message says what to fetch and what is skipped."""


# ------------------------------------------------------------------------------------------ images
def jpeg_roundtrip(image, quality: int = 75):
    """``PIL.Image`` -> the same image after ``image.save(f, "JPEG", quality=quality)`` and decoding
    (PIL's defaults otherwise: 4:2:0 chroma subsampling, as ``image.save("x.jpg")`` writes)."""
    from PIL import Image

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def load_images(paths: Sequence[str | Path], size: int | None = None, jpeg_quality: int | None = None) -> Tensor:
    """PNG/JPEG files -> float tensor in [0, 1], ``(B, 3, H, W)`` (``uint8 / 255``). Without ``size`` all
    images must share a size; with it each is resized (shorter side to ``size``, bicubic) and
    centre-cropped. ``jpeg_quality``: each image goes through ``jpeg_roundtrip`` first."""
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
            if jpeg_quality is not None:
                im = jpeg_roundtrip(im, jpeg_quality)
            arrs.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size: {sorted(shapes)}; resize them first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def save_images(images: Tensor, paths: Sequence[str | Path]) -> None:
    """Float images in [0, 1] ``(B, 3, H, W)`` -> 8-bit PNG files (rounded, clamped), each written to a
    temporary name of this process's own and renamed into place."""
    from PIL import Image

    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for arr, p in zip(u8, paths):
        with atomic_path(p) as tmp:  # a killed write never leaves a truncated PNG under its final name
            Image.fromarray(arr).save(tmp, format="PNG")


@dataclass
class ImageSet:
    """An ordered list of image files. ``fingerprint()`` = sha256 over (name, bytes) of every file and the
    load options (``size``, ``jpeg_quality``)."""

    paths: list[Path]
    #: when set, every image is resized (shorter side, bicubic) and centre-cropped to size x size on load
    size: int | None = None
    #: when set, every image is JPEG-encoded at this quality and decoded on load (``jpeg_roundtrip``)
    jpeg_quality: int | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path, size: int | None = None, jpeg_quality: int | None = None) -> "ImageSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
        return cls(paths, size, jpeg_quality)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> "ImageSet":
        return cls([Path(p) for p in paths])

    def with_jpeg(self, quality: int | None) -> "ImageSet":
        """The same files loaded through a JPEG round trip at ``quality`` (None: as stored)."""
        return ImageSet(list(self.paths), self.size, quality)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            for p in self.paths:
                h.update(p.name.encode())
                h.update(b"\0")
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                h.update(b"\1")
            h.update(f"size={self.size}".encode())
            if self.jpeg_quality is not None:
                h.update(f"jpeg={self.jpeg_quality}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def load(self, indices: Sequence[int]) -> Tensor:
        return load_images([self.paths[i] for i in indices], self.size, self.jpeg_quality)


def _check_images(images: Tensor) -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return images.float()


# ------------------------------------------------------------------------------------------ extractor base
class FeatureExtractor(nn.Module):
    """Base: ``forward(images in [0,1], (B,3,H,W)) -> (B, D)`` float32; ``id`` keys the cache."""

    name: str = ""
    id: str = ""

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        dev = next(iter(self.buffers()), None)
        dev = dev.device if dev is not None else next(self.parameters()).device
        return self(_check_images(images).to(dev)).float().cpu()


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _pooled(out: Any) -> Tensor:
    """transformers 4.x returns a tensor from get_*_features; 5.x an output with pooler_output."""
    if isinstance(out, Tensor):
        return out
    return out.pooler_output


def _from_pretrained(cls, name: str, what: str, metrics: str, **kwargs):
    """``cls.from_pretrained(name)`` that turns a missing download into a ``MissingWeights`` message."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:  # offline / not cached / not a model folder
        raise MissingWeights(
            f"{what}: cannot load {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"On a machine with internet run `huggingface-cli download {name}` (or pass a local folder). "
            f"Skipped metrics: {metrics}."
        ) from err


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80]


# ------------------------------------------------------------------------------------------ content hashes
_DIGESTS: dict[tuple[str, int, int], str] = {}


def default_digest_cache() -> Path:
    """``file_digests.json`` in odecm's cache folder (``odecm.runs.cache_root()``: ``$ODECM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``)."""
    from odecm.runs import cache_root

    return cache_root() / "file_digests.json"


def file_digest(path: str | Path, cache_file: str | Path | None = None) -> str:
    """BLAKE2b-256 of the file's bytes (hex). Remembered per ``(absolute path, size, mtime_ns)`` in memory
    and in the JSON file ``cache_file`` (default ``default_digest_cache()``), so an unchanged multi-GB file
    is hashed once; any write to the file changes its mtime and so its entry."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    table: dict[str, str] = {}
    cache = Path(cache_file) if cache_file is not None else default_digest_cache()
    entry = f"{key[0]}|{key[1]}|{key[2]}"
    if cache.is_file():
        try:
            table = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            table = {}
        if entry in table:
            _DIGESTS[key] = table[entry]
            return table[entry]
    h = hashlib.blake2b(digest_size=32)
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGESTS[key] = digest
    table[entry] = digest
    try:
        write_json_atomic(cache, table, indent=0)
    except OSError:  # a read-only home: the in-memory entry still serves this process
        pass
    return digest


def _hub_revision(repo_id: str) -> str | None:
    """Commit hash of the locally cached snapshot of a hub repo (None when it is not cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True)).name
    except Exception:  # not a repo id, not cached, hub client missing
        return None


def weights_fingerprint(name_or_path: str | None, cache_file: str | Path | None = None) -> str | None:
    """Identity of weights by content: a local file or folder -> ``<name>@<hash>`` over every file's
    relative path and ``file_digest``; a hub id -> ``<id>@<cached snapshot commit>`` (the id alone when
    it is not cached locally). Editing any tensor changes the result even when file sizes do not."""
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if not p.exists():
        rev = _hub_revision(str(name_or_path))
        return f"{name_or_path}@{rev}" if rev else str(name_or_path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        rel = f.relative_to(p).as_posix() if p.is_dir() else f.name
        if "/." in f"/{rel}" or rel.endswith(".tmp"):  # hidden files (caches, locks) and partial writes
            continue
        h.update(rel.encode() + b"\0" + file_digest(f, cache_file).encode() + b"\1")
    return f"{p.name}@{h.hexdigest()[:16]}"


# ------------------------------------------------------------------------------------------ cache + shards
def _state():
    """accelerate's PartialState (single process when not launched by accelerate / torchrun; without
    a GPU the processes talk over gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def cached(cache_dir: str | Path | None, key_name: str, key: str, compute: Callable[[], Tensor]) -> Tensor:
    """Load ``<cache_dir>/<key_name>-<sha(key)[:16]>.safetensors`` if present, else compute and store it."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{_slug(key_name)}-{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    out = compute()
    state = _state()
    if state.is_main_process:
        with atomic_path(path) as tmp:
            save_file({"features": out.contiguous()}, str(tmp), metadata={"key": key})
    state.wait_for_everyone()
    return out


def _sharded(n: int, batch_size: int, fn: Callable[[list[int]], Tensor], desc: str, progress: bool = True) -> Tensor:
    """Apply ``fn`` to batches of indices; with several processes each takes a contiguous shard and
    the results are gathered in order."""
    from tqdm.auto import tqdm

    state = _state()
    with state.split_between_processes(list(range(n))) as mine:
        chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        outs = [fn(c) for c in tqdm(chunks, desc=desc, disable=not progress or not state.is_main_process)]
        local = torch.cat(outs) if outs else None
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    parts = gather_object([(mine[0] if mine else n, local)])  # (first index, features) per process
    parts = sorted((p for p in parts if p[1] is not None), key=lambda p: p[0])
    return torch.cat([p[1] for p in parts])


def extract_features(extractor: FeatureExtractor, images: ImageSet, cache_dir: str | Path | None = None,
                     batch_size: int = 16, progress: bool = True) -> Tensor:
    """Features of every image in ``images`` (cached by image-file hash + load options + ``extractor.id``)."""
    key = json.dumps({"extractor": extractor.id, "images": images.fingerprint(), "n": len(images)})
    return cached(cache_dir, extractor.name, key,
                  lambda: _sharded(len(images), batch_size, lambda idx: extractor.embed(images.load(idx)),
                                   f"{extractor.name} features", progress))


def extract_text_features(clip, captions: Sequence[str], cache_dir: str | Path | None = None,
                          batch_size: int = 64, progress: bool = False) -> Tensor:
    """Normalised CLIP text embeddings of ``captions`` (cached by caption hash + model id)."""
    captions = list(captions)
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    key = json.dumps({"extractor": clip.id + ":text", "captions": digest, "n": len(captions)})
    return cached(cache_dir, "clip-text", key,
                  lambda: _sharded(len(captions), batch_size, lambda idx: clip.embed_text([captions[i] for i in idx]),
                                   "clip text", progress))


# ------------------------------------------------------------------------------------------ Fréchet distance
def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Frechet distance between two feature sets: ``odecm.metrics.frechet_distance_features``
    (which switches to an exact low-rank form when there are fewer samples than dimensions)."""
    from odecm.metrics import frechet_distance_features

    return frechet_distance_features(f1, f2)


def fd_sample_note(metric: str, n_a: int, n_b: int, dim: int) -> str | None:
    """A warning when either set has ``n <= d`` samples: its covariance estimate then has rank at most
    ``n - 1 < d``, and the Fréchet distance is dominated by that estimation error (bias ~ d / n).
    None when both sets have more samples than dimensions."""
    n = min(int(n_a), int(n_b))
    if n > dim:
        return None
    return (f"{metric}: {n} samples <= {dim} feature dimensions (sets of {n_a} and {n_b}); the covariance "
            f"estimates are rank-deficient (rank <= {max(n - 1, 0)}), so this Fréchet distance is dominated by "
            f"estimation error and is not comparable to values from larger sets (use n >> {dim}).")
