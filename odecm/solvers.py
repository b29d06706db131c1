"""Probability-flow ODE solvers.

All one-step solvers share one signature, ``step(denoiser, x, t_from, t_to, cond) -> x_next``,
with per-sample times (``t_from``, ``t_to`` of shape ``(B,)`` or scalars). They work in the scaled
coordinates of the PF-ODE, ``y = x / alpha``, ``s = sigma / alpha``, where every schedule's ODE reads

    dy/ds = (y - x0_hat(x, t)) / s = eps_hat(x, t),        x = alpha(t) y.

* ``ddim`` — the exact first-order data-prediction step ``x' = alpha' x0_hat + sigma' eps_hat``.
* ``euler`` — Euler on ``dy/ds`` (diffusers' EulerDiscreteScheduler and EDM's Euler):
  ``y' = y + (s' - s) eps_hat``. In exact arithmetic this is the same update as DDIM (Karras et
  al. 2022, Sec. 3); the two differ only through the grids they are used on (diffusers' Euler ends
  at sigma = 0, its DDIM at alphas_cumprod[0]) and float rounding. Both are first order.
* ``heun`` — EDM's Heun (Alg. 1) / diffusers' HeunDiscreteScheduler: an Euler predictor, then the
  trapezoid ``y' = y + (s' - s)(d + d')/2``; a step that ends at ``s' = 0`` is a plain Euler step.

``solve`` runs a batch from each sample's own start index down to index 0 of a grid;
``solve_adaptive`` integrates the ODE with torchdiffeq (dopri5 / dopri8) for reference solutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .denoisers import Denoiser, NFECounter, batch_time, broadcast_time, index_cond

Tensor = torch.Tensor

__all__ = [
    "Solver",
    "DDIM",
    "Euler",
    "Heun",
    "SOLVERS",
    "get_solver",
    "SolveResult",
    "solve",
    "solve_adaptive",
]


class Solver:
    """A one-step PF-ODE solver. ``order`` is its convergence order, ``evals_per_step`` the
    denoiser calls of an interior step."""

    name: str = ""
    order: int = 0
    evals_per_step: int = 1

    def step(self, denoiser: Denoiser, x: Tensor, t_from: Any, t_to: Any, cond: Any = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _scaled(denoiser: Denoiser, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t) and s(t) = sigma/alpha, broadcast against x."""
    sch = denoiser.schedule
    return broadcast_time(sch.alpha(t), x), broadcast_time(sch.sigma_tilde(t), x)


class DDIM(Solver):
    """``x' = alpha(t') x0_hat + sigma(t') eps_hat`` (Song et al. 2021, eta = 0)."""

    name, order = "ddim", 1

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        pred = denoiser(x, t_from, cond)
        sch = denoiser.schedule
        return broadcast_time(sch.alpha(t_to), x) * pred.x0 + broadcast_time(sch.sigma(t_to), x) * pred.eps


class Euler(Solver):
    """Euler on ``dy/ds = eps_hat``: ``x' = alpha(t') (x / alpha(t) + (s' - s) eps_hat)``."""

    name, order = "euler", 1

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        a, s = _scaled(denoiser, x, t_from)
        a2, s2 = _scaled(denoiser, x, t_to)
        eps = denoiser(x, t_from, cond).eps
        return a2 * (x / a + (s2 - s) * eps)


class Heun(Solver):
    """EDM's Heun step in ``(y, s)``; falls back to Euler where ``s(t') == 0``.

    Samples whose step ends at s' = 0 skip the corrector, and the corrector's denoiser call is
    made on the remaining samples only."""

    name, order, evals_per_step = "heun", 2, 2

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        a, s = _scaled(denoiser, x, t_from)
        a2, s2 = _scaled(denoiser, x, t_to)
        y = x / a
        d = denoiser(x, t_from, cond).eps
        y_pred = y + (s2 - s) * d
        needs_corrector = denoiser.schedule.sigma_tilde(t_to) > 0
        if not bool(needs_corrector.any()):
            return a2 * y_pred
        if bool(needs_corrector.all()):
            d2 = denoiser(a2 * y_pred, t_to, cond).eps
            return a2 * (y + (s2 - s) * 0.5 * (d + d2))
        idx = needs_corrector.nonzero(as_tuple=True)[0]
        d2 = denoiser((a2 * y_pred)[idx], t_to[idx], index_cond(cond, idx)).eps
        y_out = y_pred.clone()
        y_out[idx] = y[idx] + (s2 - s)[idx] * 0.5 * (d[idx] + d2)
        return a2 * y_out


SOLVERS: dict[str, type[Solver]] = {"ddim": DDIM, "euler": Euler, "heun": Heun}


def get_solver(name: str) -> Solver:
    """Solver by name: one of ``SOLVERS`` (ddim, euler, heun)."""
    if name not in SOLVERS:
        raise ValueError(f"solver={name!r} is unknown; allowed: {sorted(SOLVERS)}")
    return SOLVERS[name]()


@dataclass
class SolveResult:
    """Endpoint of ``solve`` and its cost: ``steps`` batched solver steps taken (the sequential
    depth), ``calls`` batched denoiser calls and ``evals`` sample evaluations (sum of batch sizes)."""

    x: Tensor
    steps: int
    calls: int
    evals: int
    trajectory: list[Tensor] | None = None


def solve(
    solver: Solver | str,
    denoiser: Denoiser,
    x: Tensor,
    grid: Tensor,
    start_index: Tensor | int,
    cond: Any = None,
    end_index: int = 0,
    mask_mode: Literal["subset", "full"] = "subset",
    return_trajectory: bool = False,
) -> SolveResult:
    """Run each sample from ``grid[start_index[b]]`` down to ``grid[end_index]``.

    The loop goes k = max(start) .. end_index + 1; at step k the samples with
    ``start_index >= k`` (already started, not yet finished) move from ``grid[k]`` to ``grid[k-1]``.
    Each sample therefore takes exactly its own ``start - end`` steps, and the result for each
    sample equals running it alone.

    ``mask_mode="subset"`` calls the denoiser on the active samples only (no wasted evaluations);
    ``"full"`` evaluates the whole batch every step and masks the update, as the paper's code does
    (same result, more evaluations; a fixed batch shape can suit compiled models).
    """
    if isinstance(solver, str):
        solver = get_solver(solver)
    if mask_mode not in ("subset", "full"):
        raise ValueError(f"mask_mode={mask_mode!r}; allowed: 'subset', 'full'")
    B = x.shape[0]
    start = torch.as_tensor(start_index, device=x.device).long()
    if start.dim() == 0:
        start = start.expand(B)
    if start.shape != (B,):
        raise ValueError(f"start_index must be a scalar or shape ({B},), got {tuple(start.shape)}")
    if int(start.min()) < end_index or int(start.max()) > grid.numel() - 1:
        raise ValueError(f"start_index must lie in [{end_index}, {grid.numel() - 1}]")
    grid = grid.to(device=x.device)
    counted = NFECounter(denoiser)
    traj = [x] if return_trajectory else None
    x = x.clone()
    steps = 0
    for k in range(int(start.max()), end_index, -1):
        active = start >= k
        t_from = grid[k].to(x.dtype if x.is_floating_point() else torch.float32)
        t_to = grid[k - 1].to(t_from.dtype)
        if mask_mode == "full" or bool(active.all()):
            x_new = solver.step(counted, x, t_from.expand(B), t_to.expand(B), cond)
            x = torch.where(broadcast_time(active, x).bool(), x_new, x) if not bool(active.all()) else x_new
        else:
            idx = active.nonzero(as_tuple=True)[0]
            n_act = idx.numel()
            x[idx] = solver.step(counted, x[idx], t_from.expand(n_act), t_to.expand(n_act), index_cond(cond, idx))
        steps += 1
        if traj is not None:
            traj.append(x.clone())
    return SolveResult(x=x, steps=steps, calls=counted.calls, evals=counted.evals, trajectory=traj)


def ode_velocity(denoiser: Denoiser, cond: Any = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The PF-ODE in ``u = log s``: ``dy/du = s eps_hat(alpha(t) y, t)`` with ``t = t(s)``."""
    sch = denoiser.schedule

    def f(u: Tensor, y: Tensor) -> Tensor:
        s = torch.exp(u).reshape(1)
        t = sch.t_from_sigma_tilde(s).to(y.dtype).expand(y.shape[0])
        a = broadcast_time(sch.alpha(t), y)
        return s.to(y.dtype) * denoiser(a * y, t, cond).eps

    return f


def solve_adaptive(
    denoiser: Denoiser,
    x: Tensor,
    t_from: float,
    t_to: float,
    cond: Any = None,
    method: Literal["dopri5", "dopri8", "tsit5", "bosh3", "adaptive_heun"] = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[Tensor, int]:
    """Reference PF-ODE solution with torchdiffeq's adaptive solvers.

    Integrates ``dy/du = s eps_hat`` in ``u = log s`` (scaled coordinates, well conditioned
    across noise scales) from ``s(t_from)`` to ``s(t_to)`` and returns ``(x(t_to), nfe)``. The whole batch shares ``t_from`` and ``t_to`` (torchdiffeq's
    step size is shared); ``t_to`` must have ``s > 0`` — stop at a small ``t_min`` rather than at
    the clean point, where the ODE is stiff. ``dtype=torch.float64`` (default) integrates in double.
    """
    from torchdiffeq import odeint

    sch = denoiser.schedule
    out_dtype = x.dtype
    if dtype is not None:
        x = x.to(dtype)
    s0 = sch.sigma_tilde(torch.tensor(float(t_from), dtype=torch.float64))
    s1 = sch.sigma_tilde(torch.tensor(float(t_to), dtype=torch.float64))
    if float(s1) <= 0:
        raise ValueError(f"t_to={t_to} has sigma = 0; stop the adaptive solver at a small t_min > t_clean")
    counted = NFECounter(denoiser)
    velocity = ode_velocity(counted, cond)
    a0 = sch.alpha(torch.tensor(float(t_from), dtype=torch.float64))
    a1 = sch.alpha(torch.tensor(float(t_to), dtype=torch.float64))
    y0 = x / a0.to(x.dtype)
    span = torch.log(torch.stack([s0, s1])).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        ys = odeint(velocity, y0, span, method=method, rtol=rtol, atol=atol)
    return (ys[-1] * a1.to(x.dtype)).to(out_dtype), counted.calls
