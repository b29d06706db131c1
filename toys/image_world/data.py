"""Image data of the image world: scikit-learn's digits (default, offline), a folder of images or a ``.npy`` array.

Every source becomes ``(N, C, H, W)`` float32 in ``[-1, 1]`` with integer labels (0 for unlabelled
data), optionally resized to ``resolution`` (folder images with PIL bicubic as they are read; digits and
``.npy`` arrays bilinear, antialiased when shrinking), then split into a
training set and a held-out set (stratified by label, seeded). Digits: 1,797 8x8 images in 10
classes, pixel values 0..16 mapped by ``v / 8 - 1``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from odecm.config import StrictModel

Tensor = torch.Tensor

__all__ = ["DataConfig", "ImageData", "load_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataConfig(StrictModel):
    """Where the images come from and how they are split."""

    source: Literal["digits", "folder", "npy"] = "digits"
    path: str | None = Field(None, description="folder (source=folder) or .npy file (source=npy)")
    labels_path: str | None = Field(None, description=".npy of integer labels for source=npy (optional)")
    resolution: int | None = Field(None, ge=4, description="resize to resolution x resolution (None: native)")
    channels: Literal[1, 3] = Field(1, description="folder images are converted to grayscale (1) or RGB (3)")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of images held out for the metrics")
    split_seed: int = 0
    max_images: int | None = Field(None, ge=10, description="use the first max_images images (after shuffling)")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "digits":
            if self.path is not None:
                raise ValueError("data.path applies to source='folder' or 'npy' only")
        else:
            if self.path is None:
                raise ValueError(f"data.path is required for data.source={self.source!r}")
            p = Path(self.path)
            if self.source == "folder" and not p.is_dir():
                raise ValueError(f"data.path={self.path!r} is not a folder")
            if self.source == "npy" and (not p.is_file() or p.suffix != ".npy"):
                raise ValueError(f"data.path={self.path!r} is not a .npy file")
        if self.labels_path is not None and self.source != "npy":
            raise ValueError("data.labels_path applies to source='npy' only")
        return self


@dataclass
class ImageData:
    """Training and held-out images ``(N, C, H, W)`` in [-1, 1] with labels ``(N,)``."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    num_classes: int
    fingerprint: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))


def _to_unit_range(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 127.5 - 1.0
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ValueError("the image array is constant")
    return (arr - lo) / (hi - lo) * 2.0 - 1.0


def _nchw(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3, 4):
            return arr
        if arr.shape[-1] in (1, 3, 4):
            return arr.transpose(0, 3, 1, 2)
    raise ValueError(f"image array of shape {arr.shape}; allowed: (N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4")


def _load_folder(folder: Path, channels: int, resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    index = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if resolution is not None:
                im = im.resize((resolution, resolution), Image.BICUBIC)
            images.append(np.asarray(im, dtype=np.uint8))
        labels.append(index[p.parent.relative_to(folder).as_posix()])
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images under {folder} have different sizes {sorted(shapes)[:4]}; set data.resolution")
    arr = np.stack(images)
    return (arr[:, None] if channels == 1 else arr.transpose(0, 3, 1, 2)), np.asarray(labels)


def load_images(cfg: DataConfig) -> ImageData:
    """Load, scale to [-1, 1], resize and split (see module docstring)."""
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
        y = d.target.astype(np.int64)
    elif cfg.source == "npy":
        x = _nchw(_to_unit_range(np.load(cfg.path)))
        y = np.load(cfg.labels_path).astype(np.int64).reshape(-1) if cfg.labels_path else np.zeros(len(x), np.int64)
        if len(y) != len(x):
            raise ValueError(f"data.labels_path has {len(y)} labels for {len(x)} images")
    else:
        raw, y = _load_folder(Path(cfg.path), cfg.channels, cfg.resolution)
        x = _to_unit_range(raw)
    images = torch.from_numpy(np.ascontiguousarray(x)).float()
    labels = torch.from_numpy(y).long()
    if cfg.resolution is not None and images.shape[-1] != cfg.resolution:
        shrink = cfg.resolution < images.shape[-1]
        images = torch.nn.functional.interpolate(images, size=(cfg.resolution, cfg.resolution), mode="bilinear",
                                                 align_corners=False, antialias=shrink).clamp(-1, 1)
    rng = np.random.default_rng(cfg.split_seed)
    order = rng.permutation(len(images))
    if cfg.max_images is not None:
        order = order[: cfg.max_images]
    images, labels = images[order], labels[order]
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(images))
    counts = np.bincount(labels.numpy())
    stratify = labels.numpy() if counts[counts > 0].min() >= 2 else None
    tr, te = train_test_split(idx, test_size=cfg.holdout_fraction, random_state=cfg.split_seed, stratify=stratify)
    tr, te = np.sort(tr), np.sort(te)
    train, test = images[tr].contiguous(), images[te].contiguous()
    h = hashlib.sha256()
    for t in (train, labels[tr], test, labels[te]):
        h.update(t.numpy().tobytes())
    return ImageData(train, labels[tr], test, labels[te], int(labels.max()) + 1, h.hexdigest()[:16])
