"""A small digit classifier whose penultimate layer is the feature space of the image world's Fréchet distance.

It plays the role of the Inception network of FID: trained once on the training split, cached, and
required to reach ``min_accuracy`` (default 95%) on the held-out split (the run stops otherwise).

Architecture: ``[conv3x3, SiLU] x 2 -> avgpool 2 -> [conv3x3, SiLU] x 2 -> avgpool to 4x4 -> flatten ->
Linear(feature_dim) -> SiLU`` (= ``features(x)``) ``-> Linear(num_classes)``. Training: cross-entropy,
Adam with cosine decay, random shifts of up to ``max_shift`` pixels (zero padding, i.e. -1 = background)
as augmentation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from odecm.config import StrictModel

from .cache import cached_module

Tensor = torch.Tensor

#: architecture / training-code version, part of the cache key
VERSION = 1

__all__ = ["ClassifierConfig", "DigitClassifier", "train_classifier", "load_classifier", "accuracy"]


class ClassifierConfig(StrictModel):
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    feature_dim: int = Field(64, ge=2)
    train_steps: int = Field(800, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    max_shift: int = Field(0, ge=0, description="random translation augmentation (pixels; 1 cost 1.5 points on digits)")
    min_accuracy: float = Field(0.95, ge=0, le=1, description="required held-out accuracy")
    seed: int = 0


class DigitClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, cfg: ClassifierConfig):
        super().__init__()
        c1, c2 = cfg.channels[0], cfg.channels[-1]
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.SiLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * c2, cfg.feature_dim), nn.SiLU())
        self.head = nn.Linear(cfg.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def features_all(self, x: Tensor, chunk: int = 2048) -> Tensor:
        """Features of ``x`` in chunks on the model's device: float64, on the CPU."""
        return torch.cat([self.features(x[i:i + chunk].to(self.device, torch.float32)).cpu()
                          for i in range(0, x.shape[0], chunk)]).double()

    @torch.no_grad()
    def predict_all(self, x: Tensor, chunk: int = 2048) -> Tensor:
        """Predicted classes (CPU)."""
        return torch.cat([self(x[i:i + chunk].to(self.device, torch.float32)).argmax(-1).cpu()
                          for i in range(0, x.shape[0], chunk)])


def _shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    if max_shift == 0:
        return x
    p = max_shift
    padded = nn.functional.pad(x, (p, p, p, p), value=-1.0)
    H, W = x.shape[-2:]
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = padded[i, :, dy:dy + H, dx:dx + W]
    return out


def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    return float((model.predict_all(images) == labels).double().mean())


def train_classifier(model: DigitClassifier, images: Tensor, labels: Tensor, cfg: ClassifierConfig,
                     progress: bool = False) -> dict[str, Any]:
    """Train in place (on the model's device)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, cfg.train_steps))))
    model.train()
    for _ in tqdm(range(cfg.train_steps), desc="classifier", disable=not progress, leave=False, mininterval=2.0):
        idx = torch.randint(images.shape[0], (cfg.batch_size,), generator=g)
        x = _shift(images[idx], cfg.max_shift, g).to(model.device)
        loss = nn.functional.cross_entropy(model(x), labels[idx].to(model.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return {"train_accuracy": accuracy(model, images, labels)}


def load_classifier(cfg: ClassifierConfig, train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                    num_classes: int, key: dict[str, Any], cache_dir=None, use_cache: bool = True,
                    progress: bool = False, device: str = "cpu") -> tuple[DigitClassifier, dict[str, Any]]:
    """The cached classifier (trained and kept on ``device``); raises if its held-out accuracy is below
    ``cfg.min_accuracy``."""
    if num_classes < 2:
        raise ValueError("the feature classifier needs labelled data with at least 2 classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DigitClassifier(train.shape[1], num_classes, cfg).to(device)
    config = {"what": "classifier", "version": VERSION, "classifier": cfg.model_dump(mode="json"), "num_classes": num_classes,
              "shape": list(train.shape[1:]), **key}
    model, info = cached_module("classifier", config, model,
                                lambda m: train_classifier(m, train, train_labels, cfg, progress), cache_dir, use_cache)
    info["test_accuracy"] = accuracy(model, test, test_labels)
    if info["test_accuracy"] < cfg.min_accuracy:
        raise RuntimeError(f"feature classifier held-out accuracy {info['test_accuracy']:.3f} < classifier.min_accuracy="
                           f"{cfg.min_accuracy} (train longer: classifier.train_steps)")
    return model, info
