"""DINOv2 ViT-L/14 features for FD-DINO (Stein et al. 2023): CLS token after the final LayerNorm.

``DinoV2`` loads ``facebook/dinov2-large`` (or a local folder) through ``transformers``; its feature is
``pooler_output``, the same vector as torch.hub DINOv2's ``x_norm_clstoken`` that dgm-eval uses. Resize to
224 x 224, two ways:

* ``resize="pil"`` (dgm-eval, the paper): the 8-bit image resized by PIL's bicubic filter (what
  ``torchvision.transforms.Resize((224, 224), BICUBIC)`` does to a PIL image), then ``/ 255``;
* ``resize="torch"``: ``F.interpolate`` bicubic with antialiasing on the float image.

Then ImageNet mean/std normalisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .features_cache import FeatureExtractor, _from_pretrained, _normalise, weights_fingerprint

Tensor = torch.Tensor

__all__ = ["DinoV2", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_DINO", "pil_bicubic_resize", "build_tiny_dinov2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINO = "facebook/dinov2-large"


def pil_bicubic_resize(images: Tensor, size: int) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> 8-bit (rounded) -> ``PIL.Image.resize((size, size), BICUBIC)`` -> ``/ 255``."""
    from PIL import Image

    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC), dtype=np.uint8) for a in u8]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255.0).to(images.device)


class DinoV2(FeatureExtractor):
    """DINOv2 (transformers ``Dinov2Model``): 224 px (PIL or torch bicubic), ImageNet mean/std, normed CLS token."""

    name = "dinov2"

    def __init__(self, name_or_path: str = DEFAULT_DINO, resolution: int = 224, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32, resize: Literal["pil", "torch"] = "pil",
                 hash_cache: str | Path | None = None):
        super().__init__()
        from transformers import Dinov2Model

        if resize not in ("pil", "torch"):
            raise ValueError(f"resize={resize!r}; allowed: 'pil', 'torch'")
        self.model = _from_pretrained(Dinov2Model, name_or_path, "FD-DINO (DINOv2 ViT-L/14)",
                                      "fd_dino_teacher, fd_dino_real", torch_dtype=dtype).to(device).eval()
        self.resolution, self.resize = int(resolution), resize
        self.dim = self.model.config.hidden_size
        self.id = f"dinov2:{weights_fingerprint(name_or_path, hash_cache)}:cls-normed:{self.resolution}:{resize}:v2"

    def forward(self, images: Tensor) -> Tensor:
        r = self.resolution
        if self.resize == "pil":
            x = pil_bicubic_resize(images, r)
        else:
            x = F.interpolate(images.clamp(0, 1), size=(r, r), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        x = _normalise(x, IMAGENET_MEAN, IMAGENET_STD).to(self.model.dtype)
        return self.model(pixel_values=x).pooler_output


def build_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``Dinov2Model`` (patch 14, hidden 32, 2 layers) to ``folder``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=224, patch_size=14)).save_pretrained(folder)
    return Path(folder)
