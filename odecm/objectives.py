"""Consistency distillation (CD), Direct CD and k-step CD as one loss with interchangeable target providers.

Notation (paper, Vouitsis et al. 2024): grid ``t_0 < t_1 < ... < t_N``; a training pair is a data
point ``x_0``, an index ``n`` in 1..N and ``x_{t_n} = alpha(t_n) x_0 + sigma(t_n) eps``.

* CD (eq. 4): ``target = f_target( Phi(x_{t_n}, t_n, t_{n-1}), t_{n-1} )`` — one teacher solver
  step, then the *target* network (EMA of the student, or the student under stop-gradient).
* Direct CD (eq. 5): ``target = f_solver(x_{t_n}, t_n, t_0)`` — the teacher solver run through every
  grid point down to ``t_0``; no target network.
* k-step CD (between the two): ``target = f_target( Phi^k(x_{t_n}), t_{m} )`` with ``m = max(n - k, 0)``
  — k teacher solver steps (fewer when n < k), then the target network at the reached time. k = 1
  is CD; k >= n is Direct CD (``f_target(x, t_0) = x`` by the boundary condition).

Loss: ``lambda(t_n) d( f_theta(x_{t_n}, t_n), target )`` averaged over the batch.

Index drawing: ``"per_sample"`` (each sample its own n ~ U{1..N}, as the paper) or ``"shared"``
(one n ~ U{1..N} for the batch). Each sample's pair (x_0, n) has the same marginal law under both.
For Direct CD the sequential teacher depth is ``max_b n_b`` per iteration under per-sample drawing
(expectation ``~ N B / (B + 1)``) against ``n`` under the shared scheme (expectation ``(N + 1)/2``);
``expected_direct_cd_cost`` gives both exactly.

Distances ``d``: ``odecm.distances`` (re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .denoisers import Denoiser, NFECounter, broadcast_time, index_cond
from .distances import DISTANCES, get_distance, l1_distance, l2_distance, pseudo_huber_distance  # noqa: F401
from .schedules import NoiseSchedule
from .solvers import Solver, get_solver, solve

Tensor = torch.Tensor

__all__ = [
    "draw_indices",
    "add_noise",
    "TargetOut",
    "CDTarget",
    "DirectCDTarget",
    "KStepTarget",
    "PrecomputedTarget",
    "make_target_provider",
    "DISTANCES",
    "get_distance",
    "WEIGHTINGS",
    "get_weighting",
    "consistency_loss",
    "expected_direct_cd_cost",
    "same_randomness",
]

IndexScheme = Literal["per_sample", "shared"]


def draw_indices(batch_size: int, num_steps: int, scheme: IndexScheme = "per_sample",
                 generator: torch.Generator | None = None, device: Any = None) -> Tensor:
    """Grid indices n in {1, ..., N}: i.i.d. per sample, or one shared by the batch."""
    if scheme == "per_sample":
        n = torch.randint(1, num_steps + 1, (batch_size,), generator=generator)
    elif scheme == "shared":
        n = torch.randint(1, num_steps + 1, (1,), generator=generator).expand(batch_size).clone()
    else:
        raise ValueError(f"index_scheme={scheme!r}; allowed: 'per_sample', 'shared'")
    return n.to(device) if device is not None else n


def expected_direct_cd_cost(num_steps: int, batch_size: int) -> dict[str, float]:
    """Expected teacher solver steps per Direct CD iteration.

    ``per_sample_depth`` = E[max of B i.i.d. U{1..N}] = sum_{k=1}^{N} (1 - ((k-1)/N)^B) (~ N B/(B+1));
    ``shared_depth`` = E[n] = (N + 1)/2; ``sample_evals_per_sample`` = E[n] = (N + 1)/2 steps per
    sample when only active samples are evaluated (odecm's ``solve``), for either scheme.
    """
    N, B = num_steps, batch_size
    e_max = sum(1.0 - ((k - 1) / N) ** B for k in range(1, N + 1))
    return {"per_sample_depth": e_max, "shared_depth": (N + 1) / 2, "approx_NB_over_B1": N * B / (B + 1),
            "sample_evals_per_sample": (N + 1) / 2}


def add_noise(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``x_t = alpha(t) x0 + sigma(t) noise`` with per-sample ``t``."""
    return broadcast_time(schedule.alpha(t), x0) * x0 + broadcast_time(schedule.sigma(t), x0) * noise


class same_randomness:
    """Context manager that runs a block with a given CPU (and CUDA) RNG state and restores the
    outer state afterwards (``torch.random.fork_rng``), so that e.g. the target network sees the
    same dropout masks as the student did."""

    def __init__(self, state: tuple[Tensor, list[Tensor] | None]):
        self.state = state
        self._fork = None

    @staticmethod
    def capture() -> tuple[Tensor, list[Tensor] | None]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    def __enter__(self):
        devices = list(range(torch.cuda.device_count())) if self.state[1] is not None else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state_all(self.state[1])
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


@dataclass
class TargetOut:
    """A target tensor and what it cost: ``calls`` batched teacher calls, ``evals`` sample
    evaluations, ``steps`` sequential solver steps."""

    value: Tensor
    calls: int = 0
    evals: int = 0
    steps: int = 0


def _grid_at(grid: Tensor, n: Tensor, like: Tensor) -> Tensor:
    return grid.to(device=like.device)[n.to(like.device)].to(like.dtype if like.is_floating_point() else torch.float32)


class _TeacherTarget:
    """A target provider built on a teacher denoiser, a one-step solver and a grid."""

    def __init__(self, teacher: Denoiser, solver: Solver | str, grid: Tensor):
        self.teacher = teacher
        self.solver = get_solver(solver) if isinstance(solver, str) else solver
        self.grid = grid


class CDTarget(_TeacherTarget):
    """CD target (eq. 4): one teacher solver step ``t_n -> t_{n-1}``, then ``target_fn`` at ``t_{n-1}``.

    ``target_fn(x, t, cond)`` is the target consistency function (EMA copy of the student, or the
    student itself — gradients are stopped here either way)."""

    method = "cd"

    def __init__(self, teacher: Denoiser, solver: Solver | str, grid: Tensor, target_fn: Callable[..., Tensor]):
        super().__init__(teacher, solver, grid)
        self.target_fn = target_fn

    @torch.no_grad()
    def __call__(self, x_tn: Tensor, n: Tensor, cond: Any = None, rng_state=None) -> TargetOut:
        teacher = NFECounter(self.teacher)
        t_n, t_prev = _grid_at(self.grid, n, x_tn), _grid_at(self.grid, n - 1, x_tn)
        x_prev = self.solver.step(teacher, x_tn, t_n, t_prev, cond)
        if rng_state is not None:
            with same_randomness(rng_state):
                value = self.target_fn(x_prev, t_prev, cond)
        else:
            value = self.target_fn(x_prev, t_prev, cond)
        return TargetOut(value.detach(), teacher.calls, teacher.evals, 1)


class DirectCDTarget(_TeacherTarget):
    """Direct CD target (eq. 5): the teacher solver from each sample's ``t_n`` down to ``t_0``.

    ``mask_mode="subset"`` evaluates only active samples (no waste); ``"full"`` evaluates the whole
    batch each step and masks updates, as the paper's code does."""

    method = "direct_cd"

    def __init__(self, teacher: Denoiser, solver: Solver | str, grid: Tensor,
                 mask_mode: Literal["subset", "full"] = "subset"):
        super().__init__(teacher, solver, grid)
        self.mask_mode = mask_mode

    @torch.no_grad()
    def __call__(self, x_tn: Tensor, n: Tensor, cond: Any = None, rng_state=None) -> TargetOut:
        res = solve(self.solver, self.teacher, x_tn, self.grid, n, cond, mask_mode=self.mask_mode)
        return TargetOut(res.x, res.calls, res.evals, res.steps)


class KStepTarget(_TeacherTarget):
    """k-step CD target: ``k`` teacher solver steps ``t_n -> t_{n-1} -> ... -> t_m``, ``m = max(n - k, 0)``
    per sample, then ``target_fn`` at ``t_m``.

    Steps are taken in lockstep relative to each sample's own start: step j (j = 0..k-1) moves every
    sample with ``n - j > 0`` from ``t_{n-j}`` to ``t_{n-j-1}`` in one batched solver step with
    per-sample times, so the sequential depth is ``min(k, max n)``.

    * ``k = 1`` is exactly ``CDTarget`` (the same single batched step and target call).
    * Samples that reach ``t_0`` (``n <= k``) take the solver's state as their target: the boundary
      condition ``f(x, t_0) = x`` imposed exactly, so ``k >= max n`` is exactly ``DirectCDTarget``'s
      per-sample result and makes no target-network call. When some samples stop above ``t_0``,
      ``target_fn`` runs on the whole batch (same dropout masks as the student, as in CD) and the
      rows at ``t_0`` keep the solver's state.

    ``mask_mode="subset"`` evaluates only the samples still stepping; ``"full"`` evaluates the whole
    batch every step and masks the update (finished samples repeat a dummy step from ``t_1``).
    """

    method = "cd_k"

    def __init__(self, teacher: Denoiser, solver: Solver | str, grid: Tensor, target_fn: Callable[..., Tensor],
                 k: int, mask_mode: Literal["subset", "full"] = "subset"):
        super().__init__(teacher, solver, grid)
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k={k!r}; allowed: an integer >= 1 (1 = CD, >= N = Direct CD)")
        if mask_mode not in ("subset", "full"):
            raise ValueError(f"mask_mode={mask_mode!r}; allowed: 'subset', 'full'")
        self.target_fn, self.k, self.mask_mode = target_fn, int(k), mask_mode

    @torch.no_grad()
    def __call__(self, x_tn: Tensor, n: Tensor, cond: Any = None, rng_state=None) -> TargetOut:
        teacher = NFECounter(self.teacher)
        n = n.to(x_tn.device)
        x = x_tn
        depth = min(self.k, int(n.max()))
        for j in range(depth):
            pos = n - j  # each sample's current grid index
            active = pos > 0
            if bool(active.all()):
                x = self.solver.step(teacher, x, _grid_at(self.grid, pos, x), _grid_at(self.grid, pos - 1, x), cond)
            elif self.mask_mode == "full":
                pos = pos.clamp(min=1)
                x_new = self.solver.step(teacher, x, _grid_at(self.grid, pos, x), _grid_at(self.grid, pos - 1, x), cond)
                x = torch.where(broadcast_time(active, x).bool(), x_new, x)
            else:
                idx = active.nonzero(as_tuple=True)[0]
                x = x.clone()
                x[idx] = self.solver.step(teacher, x[idx], _grid_at(self.grid, pos[idx], x),
                                          _grid_at(self.grid, pos[idx] - 1, x), index_cond(cond, idx))
        m = (n - self.k).clamp(min=0)
        at_t0 = m == 0
        if bool(at_t0.all()):
            value = x
        else:
            t_m = _grid_at(self.grid, m, x)
            if rng_state is not None:
                with same_randomness(rng_state):
                    value = self.target_fn(x, t_m, cond)
            else:
                value = self.target_fn(x, t_m, cond)
            if bool(at_t0.any()):
                value = torch.where(broadcast_time(at_t0, value).bool(), x.to(value.dtype), value)
        return TargetOut(value.detach(), teacher.calls, teacher.evals, depth)


class PrecomputedTarget:
    """Targets computed beforehand (Direct CD targets do not depend on the student): the caller
    passes ``target=`` to ``consistency_loss``; this provider only refuses to be called without it."""

    method = "direct_cd"

    def __call__(self, x_tn, n, cond=None, rng_state=None) -> TargetOut:  # pragma: no cover - guard
        raise RuntimeError("PrecomputedTarget: pass the stored target to consistency_loss(target=...)")


METHODS = ("cd", "direct_cd", "cd_k")


def make_target_provider(method: str, teacher: Denoiser, solver: Solver | str, grid: Tensor,
                         target_fn: Callable | None = None, mask_mode: str = "subset", k: int | None = None):
    """``"cd"`` -> CDTarget (needs ``target_fn``), ``"direct_cd"`` -> DirectCDTarget,
    ``"cd_k"`` -> KStepTarget (needs ``target_fn`` and ``k`` >= 1; k = 1 is CD, k >= N is Direct CD).
    ``k`` is accepted only with ``"cd_k"``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {list(METHODS)}")
    if k is not None and method != "cd_k":
        raise ValueError(f"k={k!r} is only used by method='cd_k' (got method={method!r})")
    if method in ("cd", "cd_k") and target_fn is None:
        raise ValueError(f"method={method!r} needs a target_fn (EMA copy or the student under stop-gradient)")
    if method == "cd":
        return CDTarget(teacher, solver, grid, target_fn)
    if method == "direct_cd":
        return DirectCDTarget(teacher, solver, grid, mask_mode=mask_mode)  # type: ignore[arg-type]
    if k is None:
        raise ValueError("method='cd_k' needs k (an integer >= 1: teacher steps before the target network)")
    return KStepTarget(teacher, solver, grid, target_fn, k, mask_mode=mask_mode)  # type: ignore[arg-type]


# --- weightings lambda(t_n) -----------------------------------------------------------------------

def _uniform_weight(schedule, grid, n):
    return torch.ones(n.shape[0], dtype=torch.float64)


def _snr_weight(schedule, grid, n):
    """``lambda = SNR(t_n) = alpha^2 / sigma^2``."""
    return schedule.snr(grid.double()[n.cpu()])


def _karras_weight(schedule, grid, n):
    """``lambda = 1 / (s(t_n) - s(t_{n-1}))`` in sigma_tilde (Song & Dhariwal 2023)."""
    g = grid.double()
    return 1.0 / (schedule.sigma_tilde(g[n.cpu()]) - schedule.sigma_tilde(g[n.cpu() - 1]))


WEIGHTINGS = {"uniform": _uniform_weight, "snr": _snr_weight, "karras": _karras_weight}


def get_weighting(name: str) -> Callable[[NoiseSchedule, Tensor, Tensor], Tensor]:
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting={name!r} is unknown; allowed: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]


# --- the loss ------------------------------------------------------------------------------------

def consistency_loss(
    student_fn: Callable[..., Tensor],
    provider: CDTarget | DirectCDTarget | KStepTarget | PrecomputedTarget,
    x0: Tensor | None,
    n: Tensor,
    grid: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    noise: Tensor | None = None,
    x_tn: Tensor | None = None,
    target: Tensor | None = None,
    distance: str | Callable = "l2",
    weighting: str = "uniform",
    generator: torch.Generator | None = None,
    share_randomness: bool = True,
) -> dict[str, Any]:
    """One CD / Direct CD loss evaluation, returned as a dict of named terms.

    Recipe:
      1. ``x_{t_n} = alpha(t_n) x_0 + sigma(t_n) eps`` (or take ``x_tn`` as given);
      2. target from the provider under no_grad (or ``target`` when precomputed); for CD the target
         network runs with the same RNG state as the student (shared dropout);
      3. student ``f_theta(x_{t_n}, t_n)``;
      4. ``loss = mean_b lambda(t_n_b) d(f_theta, target)_b``.

    Returns ``loss`` (scalar with grad), ``distance`` (unweighted batch mean, detached),
    ``per_sample`` (B,), ``weights`` (B,), ``target_calls`` / ``target_evals`` / ``target_steps``
    (teacher cost), ``x_tn``, ``prediction`` and ``target``.
    """
    if x_tn is None:
        if x0 is None:
            raise ValueError("pass x0 (and optionally noise) or x_tn")
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
        t_n = _grid_at(grid, n, x0)
        x_tn = add_noise(schedule, x0, t_n, noise)
    else:
        t_n = _grid_at(grid, n, x_tn)
    rng_state = same_randomness.capture() if share_randomness else None
    if target is None:
        if rng_state is not None:
            with same_randomness(rng_state):  # teacher/target randomness never advances the student's
                out = provider(x_tn, n, cond, rng_state=rng_state)
        else:
            out = provider(x_tn, n, cond)
    else:
        out = TargetOut(target)
    # the target ran in a fork of the RNG state captured above, so the student now draws the same
    # dropout masks from the (unchanged) global generator, which then advances as usual
    pred = student_fn(x_tn, t_n, cond)
    per_sample = get_distance(distance)(pred, out.value.to(pred.dtype))
    weights = get_weighting(weighting)(schedule, grid, n).to(device=per_sample.device, dtype=per_sample.dtype)
    loss = (weights * per_sample).mean()
    return {
        "loss": loss,
        "distance": float(per_sample.detach().mean()),
        "per_sample": per_sample.detach(),
        "weights": weights,
        "target_calls": out.calls,
        "target_evals": out.evals,
        "target_steps": out.steps,
        "x_tn": x_tn,
        "prediction": pred,
        "target": out.value,
    }
