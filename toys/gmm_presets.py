"""Named 2D (and d-dimensional) Gaussian-mixture presets for the toys: ``make_preset(name, dim, ...)``."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .gmm import GaussianMixture

Tensor = torch.Tensor

__all__ = ["PRESETS", "make_preset"]


def _ring(n: int, radius: float, phase: float = 0.0) -> Tensor:
    ang = phase + 2.0 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)


def _rotation2(theta: Tensor) -> Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _preset_ring8(n_modes: int = 8, radius: float = 1.0, std: float = 0.1):
    return torch.full((n_modes,), 1.0 / n_modes), _ring(n_modes, radius), torch.full((n_modes,), std**2)


def _preset_grid25(n_side: int = 5, spacing: float = 0.5, std: float = 0.08):
    c = (torch.arange(n_side, dtype=torch.float64) - (n_side - 1) / 2) * spacing
    gx, gy = torch.meshgrid(c, c, indexing="xy")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    K = means.shape[0]
    return torch.full((K,), 1.0 / K), means, torch.full((K,), std**2)


def _preset_twoscale(n_outer: int = 4, n_inner: int = 4, outer_radius: float = 1.5, outer_std: float = 0.2,
                     inner_radius: float = 0.2, inner_std: float = 0.02):
    means = torch.cat([_ring(n_outer, outer_radius), _ring(n_inner, inner_radius, phase=math.pi / n_inner)])
    var = torch.cat([torch.full((n_outer,), outer_std**2), torch.full((n_inner,), inner_std**2)])
    w = torch.cat([torch.full((n_outer,), 0.5 / n_outer), torch.full((n_inner,), 0.5 / n_inner)])
    return w, means, var


def _preset_imbalanced(n_modes: int = 8, radius: float = 1.0, std: float = 0.1, ratio: float = 0.6):
    w = ratio ** torch.arange(n_modes, dtype=torch.float64)
    return w / w.sum(), _ring(n_modes, radius), torch.full((n_modes,), std**2)


def _preset_aniso(n_modes: int = 6, radius: float = 1.0, std_major: float = 0.25, std_minor: float = 0.03,
                  tilt: float = math.pi / 4):
    means = _ring(n_modes, radius)
    ang = 2.0 * math.pi * torch.arange(n_modes, dtype=torch.float64) / n_modes + tilt
    R = _rotation2(ang)
    D = torch.diag(torch.tensor([std_major**2, std_minor**2], dtype=torch.float64))
    covs = R @ D @ R.transpose(-1, -2)
    return torch.full((n_modes,), 1.0 / n_modes), means, covs


PRESETS = {
    "ring8": _preset_ring8,
    "grid25": _preset_grid25,
    "twoscale": _preset_twoscale,
    "imbalanced": _preset_imbalanced,
    "aniso": _preset_aniso,
    "random": None,  # built in any dimension directly (see make_preset)
}


def _random_orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def make_preset(name: str, dim: int = 2, dtype: torch.dtype = torch.float32, embed: str = "pad",
                noise_std: float | None = None, seed: int = 0, **kw) -> "GaussianMixture":
    """Named mixtures, scaled so the per-coordinate data std is ~0.6-0.8 (``data_std()``): unit-ish,
    so SDXL-like schedules (sigma_max ~ 14.6) fully cover the data and sigma_data = 0.5 boundary
    scalings are sensible. Defaults (override any with ``**kw``):

    * ``ring8``: 8 isotropic modes on a circle, ``radius=1, std=0.1`` (data std 0.71).
    * ``grid25``: 5x5 grid, ``spacing=0.5`` centred at 0, ``std=0.08`` (data std 0.71).
    * ``twoscale``: 4 wide modes on a ring ``outer_radius=1.5, outer_std=0.2`` and 4 narrow ones
      ``inner_radius=0.2, inner_std=0.02`` (weights 1/2 per scale; data std 0.77).
    * ``imbalanced``: ring8 with weights ``ratio**k`` normalised (``ratio=0.6``: 0.40 ... 0.011; data std 0.59).
    * ``aniso``: 6 modes on a unit circle, full covariances with stds ``std_major=0.25,
      std_minor=0.03``, the major axis at angle ``theta_k + tilt`` (``tilt=pi/4``).
    * ``random``: ``n_modes=8`` means ``~ spread * N(0, I_dim)`` (``spread=0.7``) drawn with ``seed``,
      isotropic ``std=0.1``; natively ``dim``-dimensional.

    ``dim > 2`` (2D presets): the 2D structure fills the first two coordinates and each extra
    coordinate is independent ``N(0, noise_std^2)`` inside every mode (default ``noise_std`` = the
    mode's own std for isotropic presets, so they stay isotropic; 0.1 for ``aniso``).
    ``embed="rotate"`` then applies a fixed random rotation (from ``seed``) so the structure is not
    axis-aligned (isotropic modes stay isotropic; others become full).
    """
    from .gmm import GaussianMixture  # toys.gmm re-exports this module's names

    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; allowed: {sorted(PRESETS)}")
    if dim < 2:
        raise ValueError(f"dim={dim}; allowed: dim >= 2")
    if embed not in ("pad", "rotate"):
        raise ValueError(f"embed={embed!r}; allowed: 'pad', 'rotate'")
    if name == "random":
        n_modes, spread, std = kw.pop("n_modes", 8), kw.pop("spread", 0.7), kw.pop("std", 0.1)
        if kw:
            raise ValueError(f"unknown keys for preset 'random': {sorted(kw)}; allowed: n_modes, spread, std")
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
        return GaussianMixture(torch.full((n_modes,), 1.0 / n_modes), means, torch.full((n_modes,), std**2), dtype=dtype)
    try:
        w, means, covs = PRESETS[name](**kw)
    except TypeError as e:
        import inspect

        allowed = list(inspect.signature(PRESETS[name]).parameters)
        raise ValueError(f"bad keys for preset {name!r}: {sorted(kw)}; allowed: {allowed}") from e
    if dim > 2:
        K, extra = means.shape[0], dim - 2
        means = torch.cat([means, torch.zeros(K, extra, dtype=torch.float64)], -1)
        if covs.dim() == 1 and noise_std is None:
            covs = covs.clone()  # isotropic stays isotropic
        else:
            nv = (0.1 if noise_std is None else noise_std) ** 2
            if covs.dim() == 1:
                covs = torch.cat([covs[:, None].expand(K, 2), torch.full((K, extra), nv, dtype=torch.float64)], -1)
            else:
                full = torch.zeros(K, dim, dim, dtype=torch.float64)
                full[:, :2, :2] = covs
                full[:, 2:, 2:] = nv * torch.eye(extra, dtype=torch.float64)
                covs = full
        if embed == "rotate":
            Q = _random_orthogonal(dim, seed)
            means = means @ Q.T
            if covs.dim() == 2:
                covs = torch.diag_embed(covs)
            if covs.dim() == 3:
                covs = Q @ covs @ Q.T
    return GaussianMixture(w, means, covs, dtype=dtype)
