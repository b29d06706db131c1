"""Teachers of the image world: the exact empirical score, or a conv UNet trained by denoising score matching.

``UNetDenoiser`` reads a network with EDM-style input scaling (SDXL's UNet predicts eps the same way):

    c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2),   c_noise = log(max(sigma / alpha, 1e-4)) / 4,
    out  = net(c_in x, c_noise, labels),   read as eps_hat (``predict="eps"``) or x0_hat (``"x0"``).

``learned_teacher`` trains it (DSM: ``E ||eps_hat - eps||^2``, or ``E w(t) ||x0_hat - x0||^2`` with
``w = SNR / (1 + SNR sigma_data^2)`` for x0), integer timesteps uniform in 1..1000 (SDXL's training
law), Adam with cosine decay, an EMA of the weights kept as the teacher, and caches it
(``toys.image_world.cache``). With ``num_classes > 0`` the label is dropped to the null class with
probability ``cond_dropout`` (classifier-free guidance training).

``score_error_per_t`` is ``toys.scores.score_error`` for images: ``E_{x ~ p_t} ||eps_T - eps*||^2 / d``
per timestep, ``eps*`` from the exact empirical teacher and ``x_t`` drawn from the training images.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from odecm.config import StrictModel
from odecm.denoisers import CFGDenoiser, Denoiser
from odecm.schedules import NoiseSchedule
from odecm.target import EMATarget

from .cache import cached_module
from .exact import EmpiricalDenoiser
from .unet import ConvUNet, UNetConfig

Tensor = torch.Tensor

#: architecture / training-code version, part of the cache key
VERSION = 1

__all__ = ["LearnedTeacherConfig", "GuidanceConfig", "UNetDenoiser", "c_noise", "learned_teacher",
           "guided", "score_error_per_t"]


class GuidanceConfig(StrictModel):
    """Class-conditional teacher with classifier-free guidance (``null``: unconditional world)."""

    scale: float = Field(2.0, ge=0, description="w in the named convention")
    convention: Literal["imagen", "lcm"] = Field("imagen", description="imagen: uncond + w (cond - uncond); lcm: cond + w (cond - uncond)")


class LearnedTeacherConfig(StrictModel):
    """The DSM-trained conv UNet teacher (one per space; cached)."""

    unet: UNetConfig = UNetConfig(channels=[16, 32])
    predict: Literal["eps", "x0"] = "eps"
    train_steps: int = Field(3000, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    ema_rate: float = Field(0.999, ge=0, lt=1, description="EMA of the weights kept as the teacher (0: last weights)")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="label -> null class probability (conditional only)")
    seed: int = 0


def c_noise(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """``log(max(sigma_tilde(t), 1e-4)) / 4`` (finite at the clean point, where outputs are unused)."""
    return (torch.log(schedule.sigma_tilde(t.to(torch.float64)).clamp(min=1e-4)) / 4.0).float()


class UNetDenoiser(Denoiser):
    """odecm denoiser around ``net(x_in, c_noise, labels)`` (see module docstring); ``cond`` = labels or None."""

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, predict: str, sigma_data: float):
        super().__init__(schedule)
        if predict not in ("eps", "x0"):
            raise ValueError(f"predict={predict!r}; allowed: 'eps', 'x0'")
        self.net, self.predict, self.sigma_data = net, predict, float(sigma_data)
        self.finite_at_zero_noise = predict == "eps"  # x0 -> eps = (x - alpha x0) / sigma is 0/0 at sigma = 0

    def forward(self, x, t, cond=None):
        a, s = self.coefficients(x, t)
        x_in = x / torch.sqrt(a * a * self.sigma_data**2 + s * s)
        dtype = next(self.net.parameters()).dtype
        out = self.net(x_in.to(dtype), c_noise(self.schedule, t).to(x.device), cond).to(x.dtype)
        return self.from_eps(x, t, out) if self.predict == "eps" else self.from_x0(x, t, out)


def _train_dsm(net: ConvUNet, cfg: LearnedTeacherConfig, images: Tensor, labels: Tensor | None, schedule: NoiseSchedule,
               sigma_data: float, num_classes: int, device: str, progress: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    den = UNetDenoiser(net, schedule, cfg.predict, sigma_data)
    ema = EMATarget(net, cfg.ema_rate)  # rate 0: no copy, the last weights are kept
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def lr_at(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (i - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t_lo, t_hi = int(schedule.t_min), int(schedule.t_max)
    losses = []
    net.train()
    for _ in tqdm(range(cfg.train_steps), desc="teacher DSM", disable=not progress, leave=False, mininterval=2.0):
        idx = torch.randint(images.shape[0], (cfg.batch_size,), generator=g)
        x0 = images[idx].to(device)
        lab = None
        if num_classes:
            lab = labels[idx].cpu().clone()
            lab[torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout] = num_classes
            lab = lab.to(device)
        t = torch.randint(t_lo, t_hi + 1, (cfg.batch_size,), generator=g).double().to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        a, s = den.coefficients(x0, t)
        pred = den(a * x0 + s * eps, t, lab)
        if cfg.predict == "eps":
            loss = ((pred.eps - eps) ** 2).mean()
        else:
            snr = (a / s) ** 2
            loss = ((snr / (1.0 + snr * sigma_data**2)) * (pred.x0 - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update()
        losses.append(loss.item())
    if not ema.is_stop_gradient:
        net.load_state_dict(ema.module.state_dict())
    tail = losses[-100:] or [float("nan")]
    return {"final_loss": sum(tail) / len(tail), "train_steps": cfg.train_steps}


def learned_teacher(cfg: LearnedTeacherConfig, images: Tensor, labels: Tensor | None, schedule: NoiseSchedule,
                    sigma_data: float, num_classes: int, key: dict[str, Any], cache_dir=None, use_cache: bool = True,
                    device: str = "cpu", progress: bool = False) -> tuple[UNetDenoiser, dict[str, Any]]:
    """The cached DSM teacher on ``images (N, C, H, W)``; ``key`` identifies the data / space it was
    trained on (it joins the cache key with ``cfg``, the class count and sigma_data)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ConvUNet(images.shape[1], cfg.unet, num_classes).to(device)
    config = {"what": "learned_teacher", "version": VERSION, "teacher": cfg.model_dump(mode="json"), "num_classes": num_classes,
              "sigma_data": round(float(sigma_data), 8), "shape": list(images.shape[1:]), **key}
    net, info = cached_module("teacher", config, net,
                              lambda m: _train_dsm(m, cfg, images, labels, schedule, sigma_data, num_classes, device, progress),
                              cache_dir, use_cache)
    return UNetDenoiser(net, schedule, cfg.predict, sigma_data), info


def guided(denoiser: Denoiser, guidance: GuidanceConfig | None, num_classes: int) -> Denoiser:
    """``CFGDenoiser`` with the null label as the unconditional input, or the denoiser itself when unguided."""
    if guidance is None:
        return denoiser
    null = lambda c: torch.full_like(torch.as_tensor(c), num_classes)  # noqa: E731
    return CFGDenoiser(denoiser, guidance.scale, guidance.convention, uncond=null)


@torch.no_grad()
def score_error_per_t(teacher: Denoiser, exact: EmpiricalDenoiser, images: Tensor, t_values: list[float],
                      n: int = 512, seed: int = 0) -> dict[str, Any]:
    """Per timestep ``t``: ``mean ||eps_teacher(x_t) - eps_exact(x_t)||^2 / d`` over ``n`` points
    ``x_t = alpha x0 + sigma eps`` with ``x0`` drawn from ``images``; and the mean over t."""
    g = torch.Generator().manual_seed(seed)
    per_t = []
    sch = exact.schedule
    dev = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    for t in t_values:
        x0 = images[torch.randint(images.shape[0], (n,), generator=g)].double().cpu()
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tt = torch.full((n,), float(t), dtype=torch.float64)
        a, s = float(sch.alpha(tt[0])), float(sch.sigma(tt[0]))
        x = a * x0 + s * eps
        e_t = teacher(x.float().to(dev), tt.float().to(dev)).eps.double().cpu()
        e_x = exact(x, tt).eps
        per_t.append(float(((e_t - e_x) ** 2).mean()))
    return {"t": [float(t) for t in t_values], "per_t": per_t, "mean": sum(per_t) / len(per_t)}
