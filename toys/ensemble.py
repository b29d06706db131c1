"""Batched ensembles of MLP students: E independent members trained at once.

Layout
------
``EnsembleMLP`` stacks E MLPs of one shape (``toys.networks.MLP``): layer ``l`` holds
``weight (E, fan_in, fan_out)`` and ``bias (E, 1, fan_out)``, and the embedding frequencies are
``freqs (E, 1, F)``. Its input is **member-major**: ``x (E*B, d)``, ``u (E*B,)``, rows
``m*B .. (m+1)*B - 1`` belonging to member m (``einops``: ``"(e b) d -> e b d"``). Internally
``h (E, B, .) = baddbmm(bias, h, weight)``, so one batched matmul per layer serves every member.
Wrapped in ``toys.networks.MLPDenoiser`` and ``odecm.consistency.ConsistencyFunction`` it is an
ordinary odecm student, and ``odecm.objectives.consistency_loss`` runs unchanged on the flattened batch.

Independence
------------
* loss: ``sum_m mean_{b in member m} lambda d(.)`` = ``E * consistency_loss(...)["loss"]`` (equal B per
  member), so each member's gradient is exactly its solo gradient;
* Adam is elementwise, EMA targets are elementwise, gradient clipping is done **per member**
  (``clip_grad_norm_per_member``, torch's ``clip_grad_norm_`` rule on each member's slice);
* data: member m draws its batches from its own ``torch.Generator(batch_seed_m)`` (fresh samples or
  rows of its route's pool), and its weights are initialised from ``Generator(seed_m)`` exactly as
  ``toys.networks.make_student(seed=seed_m)`` would.

Hence training an ensemble gives, member by member, the result of training that member alone with
the same seeds (tested: exact up to float rounding, ``tests/test_ensemble.py``).

Modules
-------
* ``toys.ensemble`` (this file): ``EnsembleMLP``, ``EnsembleStudent``, ``make_ensemble_student``,
  ``clip_grad_norm_per_member`` (defined in ``toys.ensemble_train``);
* ``toys.ensemble_targets``: ``TargetPool`` (precomputed Direct CD targets), ``Route``, ``RoutedTarget``
  (CD / k-step / Direct CD targets for members on different (teacher, solver) routes);
* ``toys.ensemble_config``: ``TrainConfig`` (how an ensemble is distilled), ``TrainHistory``;
* ``toys.ensemble_train``: ``train_ensemble`` (the loop, k-step targets, the Direct-CD-then-CD
  schedule, evaluation callbacks, the per-member NaN/inf guard), ``init_from_teacher``.

Everything is re-exported here: ``from toys.ensemble import train_ensemble`` works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange, repeat
from torch import nn

from odecm.consistency import ConsistencyFunction, make_boundary
from odecm.schedules import NoiseSchedule

from .networks import ACTIVATIONS, MLP, MLPDenoiser, NetworkConfig, time_features

Tensor = torch.Tensor

__all__ = [
    "EnsembleMLP",
    "EnsembleStudent",
    "make_ensemble_student",
    # re-exported from toys.ensemble_targets / toys.ensemble_config / toys.ensemble_train
    "TargetPool",
    "Route",
    "RoutedTarget",
    "TrainConfig",
    "TrainHistory",
    "NonFiniteTrainingError",
    "train_ensemble",
    "ensemble_loss",
    "init_from_teacher",
    "clip_grad_norm_per_member",
    "member_norms",
]


class EnsembleMLP(nn.Module):
    """E stacked MLPs of one ``NetworkConfig`` shape; ``forward(x (E*B, d), u (E*B,)) -> (E*B, d)``."""

    def __init__(self, config: NetworkConfig, members: Sequence[MLP]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.config = config
        self.num_members = len(members)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([m.layers[i].weight.detach().T for m in members]).contiguous())
            for i in range(len(config.layer_sizes)))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([m.layers[i].bias.detach()[None] for m in members]).contiguous())
            for i in range(len(config.layer_sizes)))
        self.register_buffer("freqs", torch.stack([m.freqs.detach()[None] for m in members]))
        self.act = ACTIVATIONS[config.activation]

    @classmethod
    def from_seeds(cls, config: NetworkConfig, seeds: Sequence[int]) -> "EnsembleMLP":
        """Member m initialised as ``MLP(config, Generator().manual_seed(seeds[m]))``."""
        return cls(config, [MLP(config, torch.Generator().manual_seed(int(s))) for s in seeds])

    def member(self, m: int) -> MLP:
        """A plain ``MLP`` holding a copy of member m's weights."""
        mlp = MLP(self.config)
        with torch.no_grad():
            for i, layer in enumerate(mlp.layers):
                layer.weight.copy_(self.weights[i][m].T)
                layer.bias.copy_(self.biases[i][m, 0])
            mlp.freqs.copy_(self.freqs[m, 0])
        return mlp.to(self.weights[0].dtype)

    @torch.no_grad()
    def load_member(self, m: int, mlp: MLP) -> None:
        """Overwrite member m's weights (and frequencies) with those of a plain ``MLP`` of the same shape."""
        if mlp.config.layer_sizes != self.config.layer_sizes or mlp.freqs.shape != self.freqs[m, 0].shape:
            raise ValueError(f"member {m}: shapes differ ({mlp.config.layer_sizes} vs {self.config.layer_sizes})")
        for i, layer in enumerate(mlp.layers):
            self.weights[i][m].copy_(layer.weight.T)
            self.biases[i][m, 0].copy_(layer.bias)
        self.freqs[m, 0].copy_(mlp.freqs)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        E = self.num_members
        if x.shape[0] % E:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of the ensemble size {E} (member-major layout)")
        u = rearrange(u.to(x.dtype), "(e b) -> e b 1", e=E)
        h = torch.cat([rearrange(x, "(e b) d -> e b d", e=E), time_features(u, self.freqs.to(x.dtype))], dim=-1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.act(h)
        return rearrange(h, "e b d -> (e b) d")


@dataclass
class EnsembleStudent:
    """An ensemble as odecm objects: ``net`` (EnsembleMLP), ``denoiser`` (MLPDenoiser) and the
    consistency function ``f`` (``f(x (E*B, d), t, cond)``), plus the members' initialisation seeds."""

    net: EnsembleMLP
    denoiser: MLPDenoiser
    f: ConsistencyFunction
    seeds: list[int]

    @property
    def num_members(self) -> int:
        return self.net.num_members

    @torch.no_grad()
    def one_step(self, x_T: Tensor, t_T: float) -> Tensor:
        """Every member's one-step output ``f_m(x_T, T)``: ``(E, M, d)``.

        ``x_T`` is ``(M, d)`` (the same noise for every member) or ``(E, M, d)`` (member m's own noise)."""
        E = self.num_members
        dtype = self.net.weights[0].dtype
        if x_T.dim() == 2:
            flat = repeat(x_T.to(dtype), "m d -> (e m) d", e=E)
        elif x_T.dim() == 3 and x_T.shape[0] == E:
            flat = rearrange(x_T.to(dtype), "e m d -> (e m) d")
        else:
            raise ValueError(f"x_T must be (M, d) or ({E}, M, d), got {tuple(x_T.shape)}")
        out = self.f(flat, torch.full((flat.shape[0],), float(t_T), dtype=dtype))
        return rearrange(out, "(e m) d -> e m d", e=E).to(x_T.dtype)

    def member_student(self, m: int) -> ConsistencyFunction:
        """Member m as a solo ``ConsistencyFunction(MLPDenoiser(MLP))`` with the same boundary."""
        den = MLPDenoiser(self.net.member(m), self.denoiser.schedule, self.denoiser.config)
        return ConsistencyFunction(den, self.f.boundary)

    def state(self) -> dict[str, Tensor]:
        """A detached copy of the ensemble's weights (``load_state`` restores it)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.net.load_state_dict(state)


def make_ensemble_student(config: NetworkConfig, schedule: NoiseSchedule, seeds: Sequence[int],
                          boundary: str = "lcm", t_min: float | None = None,
                          dtype: torch.dtype = torch.float32) -> EnsembleStudent:
    """E = len(seeds) members, member m initialised from ``seeds[m]``; boundary ``lcm`` | ``edm``."""
    net = EnsembleMLP.from_seeds(config, seeds).to(dtype)
    den = MLPDenoiser(net, schedule, config)
    f = ConsistencyFunction(den, make_boundary(boundary, schedule, t_min=t_min))
    return EnsembleStudent(net, den, f, [int(s) for s in seeds])


# the training half (imported last: it builds on the classes above)
from .ensemble_targets import Route, RoutedTarget, TargetPool  # noqa: E402
from .ensemble_config import TrainConfig, TrainHistory  # noqa: E402
from .ensemble_train import (NonFiniteTrainingError, clip_grad_norm_per_member, ensemble_loss,  # noqa: E402
                             init_from_teacher, member_norms, train_ensemble)
