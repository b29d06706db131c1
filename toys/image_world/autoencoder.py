"""A small convolutional KL autoencoder: SDXL's VAE in miniature (e.g. 8x8x1 -> 4x4x4, 16x16x1 -> 4x4x4).

Encoder ``x -> (mu, log var)`` of a diagonal Gaussian posterior over a ``latent_channels x H/f x W/f``
latent (``f = downsample``, a power of 2); decoder ``z -> x``. Training minimises

    L = mean (decoder(z) - x)^2 + kl_weight * mean KL(N(mu, var) || N(0, 1)),   z = mu + sqrt(var) eps,

(both means over elements), Adam with cosine decay. As with SDXL's ``scaling_factor``, latents are
scaled by ``latent_scale = 1 / std(mu over the training set)`` so the diffusion sees unit-variance
latents: ``encode(x) = latent_scale * mu(x)`` (the posterior mean: deterministic) and
``decode(z) = decoder(z / latent_scale)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from odecm.config import StrictModel

from .cache import cached_module

Tensor = torch.Tensor

#: architecture / training-code version, part of the cache key
VERSION = 1

__all__ = ["AutoencoderConfig", "KLAutoencoder", "train_autoencoder", "load_autoencoder"]


class AutoencoderConfig(StrictModel):
    latent_channels: int = Field(4, ge=1)
    downsample: int = Field(2, ge=1, description="spatial factor, a power of 2 (8x8 -> 4x4 at 2)")
    width: int = Field(32, ge=4)
    kl_weight: float = Field(1e-4, ge=0)
    train_steps: int = Field(2000, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0

    @field_validator("downsample")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"downsample={v}; allowed: a power of 2 (1, 2, 4, ...)")
        return v


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.SiLU())


class KLAutoencoder(nn.Module):
    def __init__(self, in_channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        w, stages = cfg.width, int(math.log2(cfg.downsample))
        enc: list[nn.Module] = [_block(in_channels, w)]
        for _ in range(stages):
            enc += [nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(), _block(w, w)]
        enc.append(nn.Conv2d(w, 2 * cfg.latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, w, 3, padding=1), nn.SiLU(), _block(w, w)]
        for _ in range(stages):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), _block(w, w)]
        dec.append(nn.Conv2d(w, in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("latent_scale", torch.ones(()))

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, log var)`` of the unscaled latent, log var clamped to [-30, 20]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor) -> Tensor:
        """``latent_scale * mu(x)``."""
        return self.latent_scale * self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """``decoder(z / latent_scale)`` (pixels, not clamped)."""
        return self.decoder(z / self.latent_scale)

    @torch.no_grad()
    def encode_all(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """``encode`` in chunks on the model's device; returns a CPU tensor."""
        s = self.latent_scale
        return torch.cat([self.encode(x[i:i + chunk].to(device=s.device, dtype=s.dtype)).cpu() for i in range(0, x.shape[0], chunk)])

    @torch.no_grad()
    def decode_all(self, z: Tensor, chunk: int = 1024) -> Tensor:
        """``decode`` in chunks on the model's device; returns a CPU tensor."""
        s = self.latent_scale
        return torch.cat([self.decode(z[i:i + chunk].to(device=s.device, dtype=s.dtype)).cpu() for i in range(0, z.shape[0], chunk)])


def train_autoencoder(model: KLAutoencoder, images: Tensor, progress: bool = False) -> dict[str, Any]:
    """Train in place on ``images (N, C, H, W)`` (on the model's device; see module docstring); sets ``latent_scale``."""
    cfg = model.cfg
    images = images.to(model.latent_scale.device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, cfg.train_steps))))
    model.train()
    recon_hist = []
    for _ in tqdm(range(cfg.train_steps), desc="autoencoder", disable=not progress, leave=False, mininterval=2.0):
        x = images[torch.randint(images.shape[0], (cfg.batch_size,), generator=g).to(images.device)]
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g).to(mu.device)
        recon = ((model.decoder(z) - x) ** 2).mean()
        kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).mean()
        loss = recon + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recon_hist.append(recon.item())
    model.eval()
    with torch.no_grad():
        mu = torch.cat([model.posterior(images[i:i + 1024])[0] for i in range(0, images.shape[0], 1024)])
        model.latent_scale.fill_(1.0 / float(mu.std()))
    tail = recon_hist[-100:] or [float("nan")]
    return {"train_recon_mse": sum(tail) / len(tail), "latent_scale": float(model.latent_scale)}


def load_autoencoder(cfg: AutoencoderConfig, images: Tensor, key: dict[str, Any], cache_dir=None,
                     use_cache: bool = True, progress: bool = False, device: str = "cpu") -> tuple[KLAutoencoder, dict[str, Any]]:
    """The cached autoencoder for ``images`` (trained and kept on ``device``); ``key`` identifies the data
    (joins the cache key with ``cfg``)."""
    if images.shape[-1] % cfg.downsample or images.shape[-2] % cfg.downsample:
        raise ValueError(f"autoencoder.downsample={cfg.downsample} does not divide the image size {tuple(images.shape[-2:])}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = KLAutoencoder(images.shape[1], cfg).to(device)
    config = {"what": "autoencoder", "version": VERSION, "autoencoder": cfg.model_dump(mode="json"), "shape": list(images.shape[1:]), **key}
    return cached_module("autoencoder", config, model, lambda m: train_autoencoder(m, images, progress), cache_dir, use_cache)
