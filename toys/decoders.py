"""Fixed latent -> observation maps, to study explanation 2 (closeness in latent space need not
survive decoding). All are deterministic given their seed, differentiable in the input, and
have no trainable parameters (weights are buffers).

* ``IdentityDecoder``: ``D(z) = z``.
* ``RandomMLPDecoder``: ``D(z) = W_skip z + MLP(z)`` with fixed random weights and tanh hidden
  layers: a smooth, injective-in-practice embedding of R^latent_dim into R^out_dim.
* ``RenderDecoder``: draws the first two latent coordinates as a Gaussian blob on a
  ``size x size`` image: ``I[i, j] = exp(-((u_j - z_0)^2 + (v_i - z_1)^2) / (2 w^2))`` with pixel centres
  ``u_j`` (columns, left to right) and ``v_i`` (rows, **top to bottom from +extent to -extent**, so
  the image looks like a plot of the point) on ``[-extent, extent]``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["IdentityDecoder", "RandomMLPDecoder", "RenderDecoder", "DECODERS", "make_decoder"]


class IdentityDecoder(nn.Module):
    """``D(z) = z`` (observation space = latent space)."""

    def __init__(self, latent_dim: int = 2):
        super().__init__()
        self.latent_dim = self.out_dim = int(latent_dim)

    def forward(self, z: Tensor) -> Tensor:
        return z


class RandomMLPDecoder(nn.Module):
    """``D(z) = W_skip z / sqrt(latent_dim) + MLP(z)``; MLP layers ``h <- tanh(W h + b)`` with
    ``W ~ N(0, gain^2 / fan_in)``, ``b ~ N(0, 0.1^2)``, a final linear ``N(0, 1 / hidden)`` layer.
    Weights are drawn from ``torch.Generator().manual_seed(seed)`` in float64 and stored as buffers."""

    def __init__(self, latent_dim: int = 2, out_dim: int = 16, hidden: int = 64, depth: int = 2, seed: int = 0,
                 gain: float = 1.5):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth}; allowed: depth >= 1")
        self.latent_dim, self.out_dim, self.hidden, self.depth, self.seed = latent_dim, out_dim, hidden, depth, seed
        g = torch.Generator().manual_seed(int(seed))
        fan_in = latent_dim
        for i in range(depth):
            self.register_buffer(f"w{i}", torch.randn(hidden, fan_in, generator=g, dtype=torch.float64) * gain / math.sqrt(fan_in))
            self.register_buffer(f"b{i}", torch.randn(hidden, generator=g, dtype=torch.float64) * 0.1)
            fan_in = hidden
        self.register_buffer("w_out", torch.randn(out_dim, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden))
        self.register_buffer("w_skip", torch.randn(out_dim, latent_dim, generator=g, dtype=torch.float64) / math.sqrt(latent_dim))
        self.float()

    def forward(self, z: Tensor) -> Tensor:
        h = z
        for i in range(self.depth):
            h = torch.tanh(h @ getattr(self, f"w{i}").to(z.dtype).T + getattr(self, f"b{i}").to(z.dtype))
        return h @ self.w_out.to(z.dtype).T + z @ self.w_skip.to(z.dtype).T


class RenderDecoder(nn.Module):
    """A 2D point as a Gaussian blob image (see the module docstring for orientation).

    ``flatten=True`` returns ``(B, size*size)``, else ``(B, 1, size, size)``. Defaults
    ``size=16, extent=2.0, blob_width=0.25`` (one pixel = 0.25 units): every preset's data lies well
    inside the frame."""

    def __init__(self, size: int = 16, blob_width: float = 0.25, extent: float = 2.0, flatten: bool = True,
                 latent_dim: int = 2):
        super().__init__()
        if latent_dim != 2:
            raise ValueError(f"latent_dim={latent_dim}; RenderDecoder draws 2D points, allowed: 2")
        self.size, self.blob_width, self.extent, self.flatten = int(size), float(blob_width), float(extent), flatten
        self.latent_dim, self.out_dim = 2, self.size * self.size
        half = extent * (1.0 - 1.0 / size)  # pixel centres
        self.register_buffer("u", torch.linspace(-half, half, size))  # columns, left -> right
        self.register_buffer("v", torch.linspace(half, -half, size))  # rows, top -> bottom

    def pixel_of(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(row, col) of the pixel whose centre is nearest to each point (for tests / plots)."""
        col = torch.argmin((self.u.to(z.dtype)[None, :] - z[:, :1]).abs(), dim=1)
        row = torch.argmin((self.v.to(z.dtype)[None, :] - z[:, 1:2]).abs(), dim=1)
        return row, col

    def forward(self, z: Tensor) -> Tensor:
        u, v = self.u.to(z.dtype), self.v.to(z.dtype)
        gx = torch.exp(-((u[None, :] - z[:, :1]) ** 2) / (2 * self.blob_width**2))  # (B, size) over columns
        gy = torch.exp(-((v[None, :] - z[:, 1:2]) ** 2) / (2 * self.blob_width**2))  # (B, size) over rows
        img = gy[:, :, None] * gx[:, None, :]  # (B, rows, cols)
        return img.reshape(z.shape[0], -1) if self.flatten else img[:, None]


DECODERS = {"identity": IdentityDecoder, "random_mlp": RandomMLPDecoder, "render": RenderDecoder}


def make_decoder(name: str, **kw) -> nn.Module:
    """Decoder by name: ``identity`` (latent_dim), ``random_mlp`` (latent_dim, out_dim, hidden, depth,
    seed, gain), ``render`` (size, blob_width, extent, flatten)."""
    if name not in DECODERS:
        raise ValueError(f"decoder={name!r} is unknown; allowed: {sorted(DECODERS)}")
    import inspect

    allowed = [p for p in inspect.signature(DECODERS[name].__init__).parameters if p != "self"]
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise ValueError(f"unknown keys {bad} for decoder={name!r}; allowed: {allowed}")
    return DECODERS[name](**kw)
