"""Small MLP students for the 2D toys, wrapped as odecm denoisers and consistency functions.

The network sees a preconditioned state and an embedded time:

    x_in  = c_in(t) x,   c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2)   (unit-variance input; off: c_in = 1)
    u     = (t - t_lo) / (t_max - t_lo)                     time_input="t"  (t_lo = t_clean, else t_min)
          = log(max(sigma_tilde(t), 1e-4)) / 4               time_input="log_sigma"  (EDM's c_noise)
    emb   = [u, sin(2 pi f_k u), cos(2 pi f_k u)]_k          f_k geometric in [1, max_frequency] ("sinusoidal")
                                                             or f_k ~ N(0, fourier_scale^2) fixed ("fourier")
    out   = MLP([x_in, emb])                                 depth hidden layers of `width`, activation

and ``MLPDenoiser`` reads ``out`` as x0_hat (``predicts="x0"``, default) or eps_hat (``"eps"``).
``consistency_student`` wraps it in ``odecm.consistency.ConsistencyFunction``
(``f = c_skip x + c_out x0_hat``, boundary ``lcm`` or ``edm``), so ``f(x, t_min) == x`` exactly.

Weights are initialised from an explicit ``torch.Generator`` (PyTorch's default rule,
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases), so a member of an ensemble
(toys.ensemble) and a solo network built from the same seed start bitwise equal.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from odecm.config import StrictModel
from odecm.consistency import ConsistencyFunction, make_boundary
from odecm.denoisers import Denoiser
from odecm.schedules import NoiseSchedule

Tensor = torch.Tensor

__all__ = [
    "NetworkConfig",
    "ACTIVATIONS",
    "frequencies",
    "time_features",
    "MLP",
    "MLPDenoiser",
    "time_input",
    "make_student",
    "consistency_student",
    "count_parameters",
]

ACTIVATIONS = {"silu": nn.functional.silu, "relu": nn.functional.relu, "gelu": nn.functional.gelu,
               "tanh": torch.tanh}


class NetworkConfig(StrictModel):
    """Architecture of an MLP student (or learned teacher)."""

    dim: int = Field(2, ge=1, description="data dimension d")
    width: int = Field(128, ge=1)
    depth: int = Field(3, ge=1, description="number of hidden layers")
    activation: Literal["silu", "relu", "gelu", "tanh"] = "silu"
    time_input: Literal["t", "log_sigma"] = "t"
    time_embedding: Literal["sinusoidal", "fourier"] = "sinusoidal"
    num_frequencies: int = Field(16, ge=0)
    max_frequency: float = Field(32.0, gt=0, description="top frequency of the sinusoidal embedding")
    fourier_scale: float = Field(8.0, gt=0, description="std of the random Fourier frequencies")
    predicts: Literal["x0", "eps"] = "x0"
    input_scaling: bool = True
    sigma_data: float = Field(0.5, gt=0, description="data std used by c_in")

    @property
    def embed_dim(self) -> int:
        return 1 + 2 * self.num_frequencies

    @property
    def layer_sizes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of each linear layer, input to output."""
        sizes = [self.dim + self.embed_dim] + [self.width] * self.depth + [self.dim]
        return list(zip(sizes[:-1], sizes[1:]))


def frequencies(config: NetworkConfig, generator: torch.Generator | None = None) -> Tensor:
    """The embedding's frequencies ``(F,)`` (float32): geometric 1..max_frequency or N(0, scale^2)."""
    F = config.num_frequencies
    if F == 0:
        return torch.zeros(0)
    if config.time_embedding == "sinusoidal":
        return torch.exp(torch.linspace(0.0, math.log(config.max_frequency), F))
    return torch.randn(F, generator=generator) * config.fourier_scale


def time_features(u: Tensor, freqs: Tensor) -> Tensor:
    """``[u, sin(2 pi f u), cos(2 pi f u)]`` along the last dim; ``u (..., 1)``, ``freqs`` broadcastable ``(..., F)``."""
    arg = 2 * math.pi * u * freqs
    return torch.cat([u, torch.sin(arg), torch.cos(arg)], dim=-1)


def _uniform_(w: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float64).mul(2 * bound).sub(bound).to(w.dtype))


class MLP(nn.Module):
    """``MLP(x_in (B, d), u (B,)) -> (B, d)``: time features concatenated to the input, then
    ``depth`` hidden layers with the activation, then a linear read-out."""

    def __init__(self, config: NetworkConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in config.layer_sizes)
        for layer in self.layers:
            _uniform_(layer.weight, layer.in_features, generator)
            _uniform_(layer.bias, layer.in_features, generator)
        self.register_buffer("freqs", frequencies(config, generator))
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        u = u.to(x.dtype).reshape(-1, 1)
        h = torch.cat([x, time_features(u, self.freqs.to(x.dtype))], dim=-1)
        for layer in self.layers[:-1]:
            h = self.act(layer(h))
        return self.layers[-1](h)


def time_input(config: NetworkConfig, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The scalar time the network sees (see module docstring), float32 per sample."""
    t = t.to(torch.float64)
    if config.time_input == "t":
        lo = schedule.t_clean if schedule.t_clean is not None else schedule.t_min
        return ((t - lo) / (schedule.t_max - lo)).float()
    return (torch.log(schedule.sigma_tilde(t).clamp(min=1e-4)) / 4).float()


class MLPDenoiser(Denoiser):
    """odecm denoiser around a network ``net(x_in, u)`` (an ``MLP`` or a ``toys.ensemble.EnsembleMLP``):
    ``x0_hat = net(c_in x, u)`` (``predicts="x0"``) or ``eps_hat = net(c_in x, u)`` (``"eps"``)."""

    finite_at_zero_noise = False  # x0 = net(...) gives eps = (x - alpha x0) / sigma; see odecm.denoisers.Denoiser

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, config: NetworkConfig):
        super().__init__(schedule)
        self.net, self.config = net, config

    def forward(self, x, t, cond=None):
        a, s = self.coefficients(x, t)
        x_in = x / torch.sqrt(a**2 * self.config.sigma_data**2 + s**2) if self.config.input_scaling else x
        out = self.net(x_in, time_input(self.config, self.schedule, t).to(x.dtype))
        return self.from_x0(x, t, out) if self.config.predicts == "x0" else self.from_eps(x, t, out)


def make_student(config: NetworkConfig, schedule: NoiseSchedule, seed: int | None = None) -> MLPDenoiser:
    """A fresh ``MLPDenoiser(MLP)`` initialised from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return MLPDenoiser(MLP(config, generator=g), schedule, config)


def consistency_student(denoiser: Denoiser, boundary: str = "lcm", t_min: float | None = None,
                        **boundary_kwargs) -> ConsistencyFunction:
    """``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` with the named boundary (``lcm`` | ``edm``)."""
    return ConsistencyFunction(denoiser, make_boundary(boundary, denoiser.schedule, t_min=t_min, **boundary_kwargs))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
