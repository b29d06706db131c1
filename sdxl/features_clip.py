"""CLIP ViT-L/14 image/text embeddings (CLIP score) and the LAION aesthetic predictor head on them.

* ``CLIPEmbedder`` (``openai/clip-vit-large-patch14``): image path = shorter side bicubic-resized to the
  model's image size, centre crop, CLIP mean/std; text path = tokenizer with truncation to 77 tokens.
  Both embeddings are L2-normalised, so ``clip_score = cos(image, caption)`` (not x 100).
* ``AestheticMLP``: the improved-aesthetic-predictor head (``sac+logos+ava1-l14-linearMSE.pth``):
  ``Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
  Linear(16,1)`` (no activations, as published; state-dict keys ``layers.{0,2,4,6,7}``) applied to
  L2-normalised CLIP ViT-L/14 image embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .features_cache import FeatureExtractor, MissingWeights, _from_pretrained, _normalise, _pooled, weights_fingerprint

Tensor = torch.Tensor

__all__ = ["CLIPEmbedder", "clip_score", "AestheticMLP", "CLIP_MEAN", "CLIP_STD", "DEFAULT_CLIP", "AESTHETIC_FILE",
           "AESTHETIC_URL", "build_tiny_clip", "write_random_aesthetic"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


def _resize_short_side_center_crop(x: Tensor, size: int) -> Tensor:
    """CLIP's preprocessing on tensors: bicubic resize of the shorter side to ``size``, centre crop."""
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    Hn, Wn = max(size, round(H * scale)), max(size, round(W * scale))
    if (Hn, Wn) != (H, W):
        x = F.interpolate(x, size=(Hn, Wn), mode="bicubic", align_corners=False, antialias=True)
    top, left = (Hn - size) // 2, (Wn - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


class CLIPEmbedder(FeatureExtractor):
    """CLIP (transformers ``CLIPModel`` + ``CLIPTokenizer``): L2-normalised image and text embeddings."""

    name = "clip"

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = 77, hash_cache: str | Path | None = None):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        what, metrics = "CLIP score / aesthetic (CLIP ViT-L/14)", "clip_score, aesthetic"
        self.model = _from_pretrained(CLIPModel, name_or_path, what, metrics, torch_dtype=dtype).to(device).eval()
        self.tokenizer = _from_pretrained(CLIPTokenizer, name_or_path, what, metrics)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(int(max_length), int(self.model.config.text_config.max_position_embeddings))
        self.dim = int(self.model.config.projection_dim)
        self.id = f"clip:{weights_fingerprint(name_or_path, hash_cache)}:img{self.image_size}:v2"

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
        model.id = f"aesthetic:{weights_fingerprint(str(path))}"
        return model.eval()

    @torch.no_grad()
    def forward(self, clip_image_embeds: Tensor) -> Tensor:
        e = F.normalize(clip_image_embeds.float(), dim=-1).to(self.layers[0].weight.device)
        return self.layers(e).squeeze(-1).cpu()


# ------------------------------------------------------------------------------------------ tiny models
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


def write_random_aesthetic(path: str | Path, input_size: int, seed: int = 0) -> Path:
    """A randomly initialised aesthetic head saved with the LAION key names (for tests / benchmarks)."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticMLP(input_size).state_dict(), path)
    return path
