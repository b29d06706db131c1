"""Low-rank adapters (LoRA) for ``nn.Conv2d`` and ``nn.Linear``, written for the image world (no peft needed).

``y = W x + (alpha / r) B A x`` with the base ``W`` frozen, ``A`` (``down``) initialised like a fresh
layer of rank ``r`` (uniform ``+-1/sqrt(fan_in)``, from an explicit generator) and ``B`` (``up``) zero, so a
network with adapters computes exactly what it computed before (the paper's LCM-LoRA student starts
at the teacher). For a convolution, ``A`` is a conv with the base's kernel, stride and padding into
``r`` channels and ``B`` a 1x1 conv back (peft's Conv2d layout).

``add_lora(net, rank, alpha)`` wraps every Conv2d / Linear in place and freezes everything else;
``adapters_disabled(net)`` runs the same network as its base (the teacher), as SDXL's student does
with ``unet.disable_adapters()``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["LoRAConv2d", "LoRALinear", "add_lora", "lora_parameters", "adapters_disabled", "lora_layers"]


def _uniform_(w: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float64).mul(2 * bound).sub(bound).to(w.dtype))


class _LoRA(nn.Module):
    base: nn.Module
    down: nn.Module
    up: nn.Module

    def _setup(self, rank: int, alpha: float, fan_in: int, generator: torch.Generator | None) -> None:
        self.rank, self.alpha, self.scale, self.enabled = int(rank), float(alpha), float(alpha) / int(rank), True
        self.base.requires_grad_(False)
        _uniform_(self.down.weight, fan_in, generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.enabled:
            out = out + self.scale * self.up(self.down(x))
        return out


class LoRAConv2d(_LoRA):
    """``base(x) + (alpha / r) up(down(x))`` around a frozen ``nn.Conv2d``."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports groups=1 convolutions only")
        self.base = base
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        k = base.kernel_size[0] * base.kernel_size[1]
        self._setup(rank, alpha, base.in_channels * k, generator)


class LoRALinear(_LoRA):
    """``base(x) + (alpha / r) up(down(x))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        self._setup(rank, alpha, base.in_features, generator)


def add_lora(net: nn.Module, rank: int = 8, alpha: float | None = None, generator: torch.Generator | None = None) -> nn.Module:
    """Wrap every ``nn.Conv2d`` and ``nn.Linear`` of ``net`` (in place; module order, so a generator gives
    reproducible adapters); freeze all other parameters. ``alpha`` defaults to ``rank`` (scale 1)."""
    alpha = float(rank) if alpha is None else float(alpha)
    net.requires_grad_(False)
    targets = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and not isinstance(m, _LoRA) and not name.endswith((".down", ".up"))]
    if not targets:
        raise ValueError("the network has no Conv2d or Linear layer to adapt")
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        wrapped = (LoRAConv2d if isinstance(m, nn.Conv2d) else LoRALinear)(m, rank, alpha, generator)
        setattr(parent, attr, wrapped)
    return net


def lora_layers(net: nn.Module) -> Iterator[_LoRA]:
    return (m for m in net.modules() if isinstance(m, _LoRA))


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``down`` and ``up`` of every wrapped layer), in module order."""
    return [p for m in lora_layers(net) for p in (m.down.weight, m.up.weight)]


@contextlib.contextmanager
def adapters_disabled(net: nn.Module):
    """Run ``net`` without its adapters (the base network: the teacher); restores the previous state."""
    layers = list(lora_layers(net))
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield net
    finally:
        for m, b in zip(layers, before):
            m.enabled = b
