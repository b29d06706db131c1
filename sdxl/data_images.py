"""Image decoding (bit depth, transparency, EXIF orientation) and SDXL's resize / flip / crop with recorded crops.

Decoding (``decode_image`` then ``to_rgb8``) gives an 8-bit RGB image for every pixel format PIL opens:

* 16-bit grayscale (PIL modes ``I;16``, ``I;16B``, ``I;16L``; mode ``I`` from a PNG): ``round(v * 255 / 65535)``,
  i.e. scaled by the real bit depth (PIL's own ``convert`` clips at 255 and gives a white image);
  16-bit RGB / RGBA / gray+alpha PNGs are reduced by PIL to their high byte, ``v >> 8``, on open (within one
  level of the same formula). Mode ``I`` of unknown bit depth and float mode ``F`` are refused (skipped).
* transparency (RGBA, LA, PA, premultiplied modes, palette or gray/RGB images with a ``transparency``
  entry): composited over ``background`` (white by default), ``out = a * rgb + (1 - a) * background``
  with ``a = alpha / 255`` (PIL's ``alpha_composite``), never by dropping alpha (which shows whatever
  colour the file stores under transparent pixels);
* EXIF orientation is applied (``ImageOps.exif_transpose``), so ``original_size`` is the upright size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

CROP_MODES = ("center", "random")
WHITE = (255, 255, 255)
#: PIL modes holding 16-bit integer samples
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: PIL modes with an alpha channel (convert("RGBA") un-premultiplies the lowercase ones)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnsupportedImageError(ValueError):
    """An image whose pixel values have no known range (float mode F, 32-bit integers)."""


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Open and fully decode an image from bytes or a path (truncated files fail here, not later)."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag (0x0112) says; unchanged without one."""
    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def bit_depth(image: Image.Image) -> int:
    """Bits per sample of an integer grayscale image: 16 for the ``I;16*`` modes and for mode ``I``
    opened from a PNG (PNG has no deeper samples), the TIFF ``BitsPerSample`` tag otherwise."""
    if image.mode in SIXTEEN_BIT_MODES:
        return 16
    if image.mode == "I":
        if image.format == "PNG":
            return 16
        tags = getattr(image, "tag_v2", None)
        bits = tags.get(258) if tags is not None else None
        if isinstance(bits, tuple):
            bits = bits[0]
        if bits in (8, 16, 32):
            return int(bits)
    raise UnsupportedImageError(f"pixel mode {image.mode} ({image.format}) of unknown bit depth")


def to_rgb8(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """8-bit RGB: deep integer samples scaled by their bit depth, transparency composited over
    ``background`` (see the module docstring)."""
    if image.mode == "F":
        raise UnsupportedImageError("float pixel mode F (range unknown)")
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        top = 2 ** bit_depth(image) - 1
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > top):
            raise UnsupportedImageError(f"pixel mode {image.mode}: values outside [0, {top}]")
        image = Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation, a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


@dataclass(frozen=True)
class ResizeCrop:
    """Resize the shorter side to ``resolution``, optional horizontal flip (p = 0.5), crop to a square.

    Returns ``(pixel_values, original_size, crop_top_left)``: pixels (3, R, R) in [-1, 1] (x / 127.5 - 1),
    original (h, w) before resizing (upright), and (top, left) of the crop in the resized, flipped image.
    Center crop: ``top = round((H - R) / 2)``, ``left = round((W - R) / 2)``; random crop: uniform
    integers in ``[0, H - R]`` and ``[0, W - R]``. The image is first made 8-bit RGB by ``to_rgb8``
    (transparency over ``background``).
    """

    resolution: int = 1024
    crop: str = "center"
    flip: bool = False
    background: tuple[int, int, int] = WHITE

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop={self.crop!r}; allowed values: {list(CROP_MODES)}")
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution}; must be >= 8")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background={self.background!r}; allowed: three integers in [0, 255]")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        res = self.resolution
        if height <= width:
            return res, max(res, int(res * width / height))
        return max(res, int(res * height / width)), res

    def __call__(self, image: Image.Image, rng: np.random.Generator):
        image = to_rgb8(upright(image), tuple(int(c) for c in self.background))
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


def make_sample(transform: ResizeCrop, image: Image.Image, caption: str, rng: np.random.Generator,
                skipped: list) -> dict:
    """The sample dict (see ``sdxl.data``) of one decoded image."""
    pixels, original, crop = transform(image, rng)
    return dict(
        pixel_values=pixels,
        caption=caption,
        original_size=original,
        crop_top_left=crop,
        target_size=(transform.resolution, transform.resolution),
        skipped=skipped,
    )
