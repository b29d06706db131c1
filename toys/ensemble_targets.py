"""Targets for batched ensembles: precomputed Direct CD pools, per-member routes, routed target providers.

Direct CD target pool
---------------------
Direct CD targets ``f_solver(x_{t_n}, t_n, 0)`` do not depend on the student, so ``TargetPool.build``
precomputes P tuples ``(x0, noise, n, x_tn, endpoint)`` once per (teacher, solver, grid, pool seed)
and members draw rows from it (``data="pool"``; CD and k-step CD then use the same training pairs
and compute their teacher moves and targets online). Cost: about ``P (N + 1) / 2`` teacher sample
evaluations (x2 for Heun). With ``train_steps * batch_size`` draws per member each row is reused
about ``train_steps * batch_size / P`` times (``studies.score_error``: 1500 * 128 / 2^16 ~ 3).
Pools of the same ``seed`` hold the same (x0, n, noise) rows whatever the teacher and solver, so
CD and Direct CD students of one seed see identical data.

Routes
------
``Route(teacher, solver, pool, label)`` per member: members of one ensemble may distil different
teachers through different solvers. ``RoutedTarget`` groups the rows of members sharing a
(teacher, solver) (one teacher call per group and step, built on ``odecm.objectives``' providers)
and runs the target network once on the whole batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from odecm.denoisers import Denoiser, broadcast_time
from odecm.objectives import CDTarget, DirectCDTarget, KStepTarget, TargetOut, add_noise, draw_indices
from odecm.schedules import NoiseSchedule
from odecm.solvers import get_solver, solve

Tensor = torch.Tensor
DataSampler = Callable[[int, torch.Generator], Tensor]

__all__ = ["TargetPool", "Route", "RoutedTarget", "TARGET_METHODS"]

#: the target kinds ``RoutedTarget`` provides: one teacher step (CD), k steps, every step to t_0 (Direct CD)
TARGET_METHODS = ("cd", "cd_k", "direct_cd")


@dataclass
class TargetPool:
    """Precomputed training pairs and their Direct CD targets for one (teacher, solver, grid):
    ``x0, noise (P, d)``, ``n (P,)`` in 1..N, ``x_tn = alpha x0 + sigma noise`` and
    ``endpoint = solve(solver, teacher, x_tn, grid, n).x`` (the teacher solver from t_n to t_0)."""

    x0: Tensor
    noise: Tensor
    n: Tensor
    x_tn: Tensor
    endpoint: Tensor
    solver: str
    seed: int = 0
    build_seconds: float = 0.0
    teacher_evals: int = 0

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Denoiser, solver: str, grid: Tensor, schedule: NoiseSchedule,
              sample_data: DataSampler, size: int, seed: int, chunk: int = 32768,
              dtype: torch.dtype = torch.float32) -> "TargetPool":
        """Draw ``size`` pairs from ``Generator(seed)`` (x0, then n, then noise) and solve each to t_0."""
        start = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed))
        x0 = sample_data(size, g).to(dtype)
        n = draw_indices(size, grid.numel() - 1, "per_sample", generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=dtype)
        x_tn = add_noise(schedule, x0, grid[n].to(dtype), noise)
        ends, evals = [], 0
        for i in range(0, size, chunk):
            res = solve(get_solver(solver), teacher, x_tn[i:i + chunk], grid, n[i:i + chunk])
            ends.append(res.x)
            evals += res.evals
        return cls(x0, noise, n, x_tn, torch.cat(ends), solver, int(seed), time.perf_counter() - start, evals)


@dataclass(frozen=True)
class Route:
    """Where member m's targets come from: its ``teacher``, ``solver`` and (for ``data="pool"``) the
    ``TargetPool`` of that (teacher, solver, seed); ``label`` names it in error messages."""

    teacher: Denoiser
    solver: str
    pool: TargetPool | None = None
    label: str = ""


def _identity_target(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    return x


class RoutedTarget:
    """Target provider for a member-major batch ``(E*B, d)`` whose members may use different routes.

    * ``"cd"`` (eq. 4): per route, ``CDTarget(teacher, solver, grid, identity)`` gives the teacher's
      move ``x_{t_{n-1}} = Phi(x_{t_n}, t_n, t_{n-1})``; then the target network runs once on the whole
      batch: ``target = f_target(x_{t_{n-1}}, t_{n-1})``.
    * ``"cd_k"``: per route, ``KStepTarget(..., identity, k)`` takes ``min(k, n)`` teacher steps to
      ``t_m``, ``m = max(n - k, 0)``; then ``target = f_target(x_{t_m}, t_m)``, except rows that reached
      ``t_0``, whose target is the solver's state (the boundary condition imposed exactly). k = 1 is CD;
      k >= N is Direct CD.
    * ``"direct_cd"`` (eq. 5, fresh data): per route ``DirectCDTarget`` (the pool's stored endpoints
      replace it for ``data="pool"``)."""

    def __init__(self, method: str, routes: Sequence[Route], batch_size: int, grid: Tensor,
                 target_fn: Callable[..., Tensor] | None = None, k: int | None = None):
        if method not in TARGET_METHODS:
            raise ValueError(f"method={method!r}; allowed: {list(TARGET_METHODS)}")
        if method != "direct_cd" and target_fn is None:
            raise ValueError(f"method={method!r} needs a target_fn (the target network)")
        if method == "cd_k" and (k is None or k < 1):
            raise ValueError(f"method='cd_k' needs k >= 1, got {k!r}")
        self.method, self.grid, self.target_fn, self.k = method, grid, target_fn, k
        self.groups: list[tuple[Any, Any]] = []
        keys: dict[tuple[int, str], list[int]] = {}
        for m, r in enumerate(routes):
            keys.setdefault((id(r.teacher), r.solver), []).append(m)
        for members in keys.values():
            r = routes[members[0]]
            rows: Any = torch.cat([torch.arange(m * batch_size, (m + 1) * batch_size) for m in members])
            if members == list(range(members[0], members[-1] + 1)):  # contiguous block: a cheap slice
                rows = slice(members[0] * batch_size, (members[-1] + 1) * batch_size)
            if method == "cd":
                prov: Any = CDTarget(r.teacher, r.solver, grid, target_fn=_identity_target)
            elif method == "cd_k":
                prov = KStepTarget(r.teacher, r.solver, grid, _identity_target, int(k))
            else:
                prov = DirectCDTarget(r.teacher, r.solver, grid)
            self.groups.append((rows, prov))

    @torch.no_grad()
    def __call__(self, x_tn: Tensor, n: Tensor, cond: Any = None, rng_state=None) -> TargetOut:
        if len(self.groups) == 1:
            out = self.groups[0][1](x_tn, n, cond)
            value, calls, evals, steps = out.value, out.calls, out.evals, out.steps
        else:
            value = torch.empty_like(x_tn)
            calls = evals = steps = 0
            for rows, prov in self.groups:
                out = prov(x_tn[rows], n[rows], cond)
                value[rows] = out.value
                calls, evals, steps = calls + out.calls, evals + out.evals, max(steps, out.steps)
        if self.method == "cd":
            value = self.target_fn(value, self.grid.to(x_tn.dtype)[n - 1], cond)
        elif self.method == "cd_k":
            m = (n - self.k).clamp(min=0)
            at_t0 = m == 0
            if not bool(at_t0.all()):
                reached = value
                value = self.target_fn(reached, self.grid.to(x_tn.dtype)[m], cond)
                value = torch.where(broadcast_time(at_t0, value).bool(), reached.to(value.dtype), value)
        return TargetOut(value.detach(), calls, evals, steps)
