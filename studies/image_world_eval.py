"""Evaluation plumbing of ``studies.image_world``: evaluation sets, teacher references, per-member metrics.

Per (space, seed) an ``EvalSet``: noise ``x_T ~ p_T`` of the space (``x_T = alpha_T x0 + sigma_T eps``,
x0 from the training points, drawn from ``eval.seed + seed``), class labels when guided, and the
exact ODE endpoint from ``x_T`` (the exact empirical teacher, guided the same way: the true ODE).
Per (space, teacher, solver, seed) a ``Reference``: the teacher's solver chain from the same ``x_T``
down the grid (the paper's teacher samples), decoded and featurised.

``member_metrics`` compares a member's one-step samples ``f(x_T, T)`` with both:
``E_solver`` / ``E_exact`` (eq. 6 in the ODE's space), ``E_solver_pixel`` / ``E_exact_pixel`` (after
decoding, pixels clamped to [-1, 1]), ``fd_teacher`` / ``fd_data`` (Fréchet distance of classifier
features to the teacher's samples / to the held-out images) and, at the final budget, precision and
recall against both, the class-histogram TV to uniform, the memorisation rate and the shrinkage ratios
(total variance and high-frequency power against the teacher's samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from odecm.denoisers import Denoiser
from odecm.solvers import solve
from toys.image_world.exact import EmpiricalDenoiser, exact_ode_endpoint
from toys.image_world.metrics import (class_histogram, class_tv, feature_metrics, frechet, memorisation, nearest_distance, ode_error,
                                      shrinkage)
from toys.image_world.teachers import guided
from toys.image_world.world import Space, World

from .common import stat

Tensor = torch.Tensor

__all__ = ["EvalSet", "Reference", "make_eval_set", "make_reference", "exact_samples", "member_metrics", "reference_row",
           "heldout_row", "fd_floor"]

#: metrics computed at every budget (cheap); the rest only at the end of training
BUDGET_KEYS = ("E_solver", "E_exact", "E_solver_pixel", "E_exact_pixel", "fd_teacher", "fd_data")


@dataclass
class EvalSet:
    seed: int
    x_T: Tensor  # (M, ...) float64, in the space
    labels: Tensor | None
    exact_end: Tensor  # (M, ...) float64
    exact_pix: Tensor  # (M, C, H, W) float32 in [-1, 1]


@dataclass
class Reference:
    chain_end: Tensor
    chain_pix: Tensor
    chain_feats: Tensor


def make_eval_set(world: World, space: Space, seed: int, num: int, base_seed: int, guidance, rtol: float,
                  device: str = "cpu") -> EvalSet:
    g = torch.Generator().manual_seed(int(base_seed) + int(seed))
    sch, t_T = world.schedule, float(world.grid[-1])
    x0 = space.train[torch.randint(space.train.shape[0], (num,), generator=g)].double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.tensor(t_T, dtype=torch.float64)
    x_T = float(sch.alpha(tt)) * x0 + float(sch.sigma(tt)) * eps
    labels = None
    if guidance is not None:
        labels = torch.randint(world.data.num_classes, (num,), generator=g)
    exact = guided(space.exact, guidance, world.data.num_classes if guidance is not None else 0)
    if guidance is None:
        flat = space.exact.mixture.exact_ode_solution(x_T.reshape(num, -1).to(device), t_T, 0.0, sch, rtol=rtol,
                                                      atol=rtol, threads=None)
        end = flat.reshape(x_T.shape).double().cpu()
    else:
        end = exact_ode_endpoint(exact, x_T.to(device), t_T, space.exact.floor_sigma(), labels.to(device), rtol, rtol).cpu()
    return EvalSet(int(seed), x_T, labels, end, space.decode(end))


@torch.no_grad()
def make_reference(world: World, space: Space, teacher: Denoiser, solver: str, ev: EvalSet, device: str = "cpu",
                   chunk: int = 1024) -> Reference:
    """The teacher's solver chain from ``ev.x_T`` (in the teacher's dtype: float64 for the exact teacher)."""
    exact = isinstance(getattr(teacher, "inner", teacher), EmpiricalDenoiser)
    dtype = torch.float64 if exact else torch.float32
    N = world.grid.numel() - 1
    outs = []
    for i in range(0, ev.x_T.shape[0], chunk):
        cond = None if ev.labels is None else ev.labels[i:i + chunk].to(device)
        outs.append(solve(solver, teacher, ev.x_T[i:i + chunk].to(device=device, dtype=dtype), world.grid, N, cond).x.double().cpu())
    end = torch.cat(outs)
    pix = space.decode(end)
    return Reference(end, pix, world.features(pix))


def exact_samples(world: World, ev: EvalSet) -> Reference:
    """The evaluation set's exact ODE endpoints as samples: in the space, decoded and featurised."""
    return Reference(ev.exact_end, ev.exact_pix, world.features(ev.exact_pix))


def member_metrics(world: World, space: Space, out: Tensor, ref: Reference, ev: EvalSet, full: bool,
                   mem_threshold: float) -> dict[str, float]:
    """Metrics of one member's samples ``out`` (see module docstring)."""
    pix = space.decode(out)
    return _metrics(world, Reference(out, pix, world.features(pix)), ref, ev, full, mem_threshold)


def _metrics(world: World, s: Reference, ref: Reference, ev: EvalSet, full: bool,
             mem_threshold: float) -> dict[str, float]:
    """``member_metrics`` of samples ``s`` already decoded and featurised (a ``Reference`` of them)."""
    end, pix, feats = s.chain_end, s.chain_pix, s.chain_feats
    row = {"E_solver": ode_error(end, ref.chain_end), "E_exact": ode_error(end, ev.exact_end),
           "E_solver_pixel": ode_error(pix, ref.chain_pix), "E_exact_pixel": ode_error(pix, ev.exact_pix),
           "fd_teacher": frechet(feats, ref.chain_feats), "fd_data": frechet(feats, world.test_features)}
    if full:
        row.update({k: v for k, v in feature_metrics(feats, ref.chain_feats, "teacher").items() if not k.startswith("fd")})
        row.update({k: v for k, v in feature_metrics(feats, world.test_features, "data").items() if not k.startswith("fd")})
        pred = world.predict(pix)
        row["class_tv"] = class_tv(pred, world.data.num_classes)
        row["class_histogram"] = class_histogram(pred, world.data.num_classes).tolist()
        row["memorisation"] = memorisation(pix, world.data.train, mem_threshold)
        row.update(shrinkage(pix, ref.chain_pix))
    return row


def reference_row(world: World, space: Space, name: str, solver: str, samples: Reference, ref: Reference | None,
                  ev: EvalSet, mem_threshold: float) -> dict[str, Any]:
    """Samples without a student (a teacher's chain, the exact ODE), given decoded and featurised, scored like
    a member; with ``ref=None`` they are their own reference (E_solver and the *_teacher metrics are then
    trivial and dropped)."""
    row = _metrics(world, samples, samples if ref is None else ref, ev, True, mem_threshold)
    if ref is None:
        row = {k: v for k, v in row.items() if not (k.startswith("E_solver") or k.endswith("_teacher")
                                                    or k in ("variance_ratio", "hf_power_ratio"))}
    return {"space": space.name, "reference": name, "solver": solver, "seed": ev.seed, **row}


def heldout_row(world: World, mem_threshold: float) -> dict[str, float]:
    """The held-out images scored as samples (memorisation rate and class TV of real data)."""
    test = world.data.test
    return {"class_tv": class_tv(world.predict(test), world.data.num_classes),
            "memorisation": memorisation(test, world.data.train, mem_threshold),
            "median_nn_distance": float(nearest_distance(test, world.data.train).median())}


def fd_floor(world: World, draws: int, seed: int) -> dict[str, Any]:
    """FD between random training subsets (the held-out size) and the held-out set: the finite-sample
    floor of ``fd_data`` (its mean, std and values over ``draws`` subsets)."""
    g = torch.Generator().manual_seed(seed)
    train_feats = world.features(world.data.train)
    n = world.test_features.shape[0]
    vals = [frechet(train_feats[torch.randperm(train_feats.shape[0], generator=g)[:n]], world.test_features)
            for _ in range(draws)]
    return {**stat(vals), "size": n}
