"""Probability-flow ODE solvers: two families, one signature.

Every one-step solver is ``step(denoiser, x, t_from, t_to, cond) -> x_next`` with per-sample times
(``t_from``, ``t_to`` of shape ``(B,)`` or scalars).

**EDM / diffusers family** (``ddim``, ``euler``, ``heun``) works in the scaled coordinates
``y = x / alpha``, ``s = sigma / alpha``, where every schedule's PF-ODE reads

    dy/ds = (y - x0_hat(x, t)) / s = eps_hat(x, t),        x = alpha(t) y.

* ``ddim`` — the exact first-order data-prediction step ``x' = alpha' x0_hat + sigma' eps_hat``.
* ``euler`` — Euler on ``dy/ds``: ``y' = y + (s' - s) eps_hat``. In exact arithmetic the same update
  as DDIM (Karras et al. 2022, Sec. 3; ``equivalent_to = "ddim"``).
* ``heun`` — EDM's Heun (Alg. 1): an Euler predictor, then the trapezoid in ``(y, s)``; a step that
  ends at ``s' = 0`` is a plain Euler step.

**The paper's VP family** (``euler_vp``, ``heun_vp``) steps the PF-ODE in ``(x, t)``:

    dx/dt = f(t) x + g(t)^2 / (2 sigma(t)) eps_hat(x, t)      (VP: f = -beta/2, g^2 = beta).

* Continuous schedules: ``f = schedule.drift``, ``g^2 = schedule.diffusion2``, ``sigma``, ``dt = t' - t``.
* ``DiscreteSchedule``: beta and sigma are the scheduler's own tables, as the paper's code reads
  them: ``beta = T betas[k]``, ``sigma = sqrt(1 - alphas_cumprod[k])`` with table index
  ``k = t - timestep_offset`` and ``dt = (t' - t) / T``; non-integer times interpolate the tables
  linearly in t (the tables themselves at integers).
* **Clean-end rule.** At ``sigma(t) = 0`` the coefficient ``g^2 / (2 sigma)`` is undefined; there the
  coefficients of the smallest positive noise level are used: table index 0 on a discrete schedule
  (the paper's ``betas[0]``, ``sigmas[0]``), ``t_min`` on a continuous one.

``solve`` runs a batch from each sample's own start index down to an end index of a grid;
``solve_adaptive`` integrates the ODE with torchdiffeq (dopri5 / dopri8) for reference solutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .denoisers import Denoiser, NFECounter, batch_time, broadcast_time, index_cond
from .schedules import DiscreteSchedule, NoiseSchedule

Tensor = torch.Tensor

__all__ = [
    "Solver",
    "DDIM",
    "Euler",
    "Heun",
    "EulerVP",
    "HeunVP",
    "vp_coefficients",
    "SOLVERS",
    "get_solver",
    "SolveResult",
    "solve",
    "solve_adaptive",
]


class Solver:
    """A one-step PF-ODE solver. ``order`` is its convergence order, ``evals_per_step`` the
    denoiser calls of an interior step, ``equivalent_to`` the registry name of a solver whose
    update it equals in exact arithmetic (None: no other)."""

    name: str = ""
    order: int = 0
    evals_per_step: int = 1
    equivalent_to: str | None = None

    def step(self, denoiser: Denoiser, x: Tensor, t_from: Any, t_to: Any, cond: Any = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _scaled(denoiser: Denoiser, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """alpha(t) and s(t) = sigma/alpha, broadcast against x."""
    sch = denoiser.schedule
    return broadcast_time(sch.alpha(t), x), broadcast_time(sch.sigma_tilde(t), x)


class DDIM(Solver):
    """``x' = alpha(t') x0_hat + sigma(t') eps_hat`` (Song et al. 2021, eta = 0).

    Reproduces diffusers' ``DDIMScheduler`` (eta = 0) and the paper's ``DDIMSolver`` (which is
    LCM's): on SDXL's discrete schedule with the tables of ``odecm.schedules``."""

    name, order = "ddim", 1

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        pred = denoiser(x, t_from, cond)
        sch = denoiser.schedule
        return broadcast_time(sch.alpha(t_to), x) * pred.x0 + broadcast_time(sch.sigma(t_to), x) * pred.eps


class Euler(Solver):
    """Euler on ``dy/ds = eps_hat``: ``x' = alpha(t') (x / alpha(t) + (s' - s) eps_hat)``.

    Reproduces EDM's Euler and diffusers' ``EulerDiscreteScheduler``; equals ``ddim`` in exact
    arithmetic (``equivalent_to = "ddim"``). Not the paper's Euler (that is ``euler_vp``)."""

    name, order, equivalent_to = "euler", 1, "ddim"

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        a, s = _scaled(denoiser, x, t_from)
        a2, s2 = _scaled(denoiser, x, t_to)
        eps = denoiser(x, t_from, cond).eps
        return a2 * (x / a + (s2 - s) * eps)


class Heun(Solver):
    """EDM's Heun step in ``(y, s)``; falls back to Euler where ``s(t') == 0``.

    Reproduces EDM's Alg. 1 and diffusers' ``HeunDiscreteScheduler``. Samples whose step ends at
    s' = 0 skip the corrector, and the corrector's denoiser call is made on the remaining samples
    only. Not the paper's Heun (that is ``heun_vp``)."""

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


# --------------------------------------------------------------------------- the paper's VP solvers
def vp_coefficients(schedule: NoiseSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of the PF-ODE in (x, t): ``dx/dtau = a(t) x + b(t) eps_hat`` with ``tau = t / T`` on a
    discrete schedule (the paper's continuous time) and ``tau = t`` on a continuous one.

    ``a = f = -beta/2``, ``b = g^2 / (2 sigma) = beta / (2 sigma)`` (VP); float64, shape of ``t``.
    Discrete: ``beta = T betas[t - offset]``, ``sigma = sqrt(1 - alphas_cumprod[t - offset])``
    (linear in t between integers; index 0 below ``t_min``, the clean point included).
    Continuous: ``f = drift``, ``g^2 = diffusion2`` at ``t`` where ``sigma(t) > 0`` and at ``t_min``
    where ``sigma(t) = 0`` (the clean-end rule)."""
    t = t.to(torch.float64)
    if isinstance(schedule, DiscreteSchedule):
        beta = schedule.table_at(schedule.vp_betas, t)
        sigma = schedule.table_at(schedule.vp_sigmas, t)
        return -0.5 * beta, 0.5 * (1.0 / sigma) * beta
    t_coef = torch.where(schedule.sigma(t) > 0, t, torch.full_like(t, float(schedule.t_min)))
    return schedule.drift(t_coef), schedule.diffusion2(t_coef) / (2.0 * schedule.sigma(t_coef))


def _vp_derivative(schedule: NoiseSchedule, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``d = a(t) x + b(t) eps`` (``vp_coefficients``), broadcast against x."""
    a, b = vp_coefficients(schedule, t)
    return broadcast_time(a, x) * x + broadcast_time(b, x) * eps


def _vp_dt(schedule: NoiseSchedule, t_from: Tensor, t_to: Tensor, x: Tensor) -> Tensor:
    """The step in the ODE's time: ``(t' - t) / T`` on a discrete schedule, ``t' - t`` otherwise."""
    dt = t_to.to(torch.float64) - t_from.to(torch.float64)
    if isinstance(schedule, DiscreteSchedule):
        dt = dt / schedule.num_train_timesteps
    return broadcast_time(dt, x)


class EulerVP(Solver):
    """The paper's Euler step on the VP PF-ODE in (x, t) (``EulerSolver`` of Vouitsis et al.'s
    ``train_cm.py`` / ``train_direct_cm.py``):

        d = -1/2 beta(t) x + 1/2 beta(t) / sigma(t) eps_hat(x, t),      x' = x + dt d,

    with beta, sigma and dt as in ``vp_coefficients`` (on SDXL's schedule with the paper's
    indexing, ``timestep_offset=1``: ``beta = T betas[t - 1]``, ``sigma = sqrt(1 - alphas_cumprod[t - 1])``,
    ``dt = (t' - t) / T``). First order; not equal to DDIM."""

    name, order = "euler_vp", 1

    def step(self, denoiser, x, t_from, t_to, cond=None):
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        d = _vp_derivative(denoiser.schedule, x, t_from, denoiser(x, t_from, cond).eps)
        return x + _vp_dt(denoiser.schedule, t_from, t_to, x) * d


class HeunVP(Solver):
    """The paper's Heun step on the VP PF-ODE in (x, t) (``EulerSolver`` predictor + ``HeunSolver``
    corrector of Vouitsis et al.'s ``train_direct_cm.py``):

        d  = a(t) x + b(t) eps_hat(x, t),                 x_pred = x + dt d,
        d' = a(t') x_pred + b(t') eps_hat(x_pred, t'),    x' = x + dt (d + d') / 2,

    with ``a, b`` from ``vp_coefficients`` and ``dt`` as in ``euler_vp``. The corrector runs on
    **every** interval, the last included: on a step that ends at the clean point (sigma(t') = 0) the
    denoiser is called at ``t' = t_clean`` (the paper calls the UNet at timestep 0) with the clean-end
    coefficients (table index 0 / ``t_min``). Where the denoiser cannot be evaluated at zero noise
    (``denoiser.finite_at_zero_noise`` False: x0-predicting networks, ``c_noise = log sigma``), that
    call is made at the schedule's ``t_min`` (the smallest positive noise level) instead; a flagged
    denoiser that returns non-finite eps there raises ``FloatingPointError``. Second order."""

    name, order, evals_per_step = "heun_vp", 2, 2

    def step(self, denoiser, x, t_from, t_to, cond=None):
        sch = denoiser.schedule
        t_from, t_to = batch_time(t_from, x), batch_time(t_to, x)
        dt = _vp_dt(sch, t_from, t_to, x)
        d = _vp_derivative(sch, x, t_from, denoiser(x, t_from, cond).eps)
        x_pred = x + dt * d
        at_zero_noise = sch.sigma(t_to) <= 0
        any_zero = bool(at_zero_noise.any())
        t_eval = t_to
        if any_zero and not denoiser.finite_at_zero_noise:
            t_eval = torch.where(at_zero_noise, torch.full_like(t_to, float(sch.t_min)), t_to)
        eps2 = denoiser(x_pred, t_eval, cond).eps
        if any_zero and not bool(torch.isfinite(eps2[at_zero_noise]).all()):
            inner = denoiser
            while hasattr(inner, "inner"):  # name the wrapped denoiser, not CFG / counting wrappers
                inner = inner.inner
            raise FloatingPointError(
                f"heun_vp: {type(inner).__name__} returned non-finite eps at zero noise (t = t_clean); "
                "set its class attribute finite_at_zero_noise = False so the last corrector uses t_min")
        d2 = _vp_derivative(sch, x_pred, t_to, eps2)
        return x + 0.5 * dt * (d + d2)


SOLVERS: dict[str, type[Solver]] = {"ddim": DDIM, "euler": Euler, "heun": Heun, "euler_vp": EulerVP, "heun_vp": HeunVP}


def get_solver(name: str) -> Solver:
    """Solver by name: one of ``SOLVERS`` (ddim, euler, heun, euler_vp, heun_vp)."""
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
    end_index: Tensor | int = 0,
    mask_mode: Literal["subset", "full"] = "subset",
    return_trajectory: bool = False,
) -> SolveResult:
    """Run each sample from ``grid[start_index[b]]`` down to ``grid[end_index[b]]``.

    ``start_index`` and ``end_index`` are scalars or per-sample ``(B,)`` with ``end <= start``. The
    loop goes k = max(start) .. min(end) + 1; at step k the samples with ``start >= k > end``
    (started, not yet finished) move from ``grid[k]`` to ``grid[k-1]``. Each sample therefore takes
    exactly its own ``start - end`` steps, and the result for each sample equals running it alone.

    ``mask_mode="subset"`` calls the denoiser on the active samples only (no wasted evaluations);
    ``"full"`` evaluates the whole batch every step and masks the update, as the paper's code does
    (same result, more evaluations; a fixed batch shape can suit compiled models).
    """
    if isinstance(solver, str):
        solver = get_solver(solver)
    if mask_mode not in ("subset", "full"):
        raise ValueError(f"mask_mode={mask_mode!r}; allowed: 'subset', 'full'")
    B = x.shape[0]
    start = _per_sample_index(start_index, B, x.device, "start_index")
    end = _per_sample_index(end_index, B, x.device, "end_index")
    if int(end.min()) < 0 or int(start.max()) > grid.numel() - 1 or bool((start < end).any()):
        raise ValueError(f"need 0 <= end_index <= start_index <= {grid.numel() - 1} per sample")
    grid = grid.to(device=x.device)
    counted = NFECounter(denoiser)
    traj = [x] if return_trajectory else None
    x = x.clone()
    steps = 0
    for k in range(int(start.max()), int(end.min()), -1):
        active = (start >= k) & (end < k)
        t_from = grid[k].to(x.dtype if x.is_floating_point() else torch.float32)
        t_to = grid[k - 1].to(t_from.dtype)
        all_active = bool(active.all())
        if mask_mode == "full" or all_active:
            x_new = solver.step(counted, x, t_from.expand(B), t_to.expand(B), cond)
            x = x_new if all_active else torch.where(broadcast_time(active, x).bool(), x_new, x)
        else:
            idx = active.nonzero(as_tuple=True)[0]
            n_act = idx.numel()
            if n_act:
                x[idx] = solver.step(counted, x[idx], t_from.expand(n_act), t_to.expand(n_act), index_cond(cond, idx))
        steps += 1
        if traj is not None:
            traj.append(x.clone())
    return SolveResult(x=x, steps=steps, calls=counted.calls, evals=counted.evals, trajectory=traj)


def _per_sample_index(index: Tensor | int, batch: int, device: Any, name: str) -> Tensor:
    idx = torch.as_tensor(index, device=device).long()
    if idx.dim() == 0:
        idx = idx.expand(batch)
    if idx.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or shape ({batch},), got {tuple(idx.shape)}")
    return idx


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
