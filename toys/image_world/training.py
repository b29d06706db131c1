"""Distilling a student ensemble: shared training pairs, CD and Direct CD through ``odecm.objectives``.

Target pool. Direct CD targets ``f_solver(x_{t_n}, t_n, t_0)`` and CD's teacher move
``Phi(x_{t_n}, t_n, t_{n-1})`` depend only on the teacher, the solver and ``(x_{t_n}, n)``, so
``build_pool`` computes both once per (teacher, solver, seed) for P rows
``(x0, label, n, x_{t_n} = alpha x0 + sigma eps)``: the solver is run from each row's own ``t_n`` down
to ``t_0`` (as ``odecm.solvers.solve``), and the state after the row's first step is CD's move.
CD and Direct CD then train on exactly the same pairs (the toys' ``TargetPool`` recipe, plus the
stored first step). Cost: ``P (N + 1) / 2`` teacher sample evaluations (x2 for Heun).

Training step (per member m, with its own generator for batch order and its own pool):
  1. draw B rows of the pool; concatenate member-major;
  2. target — CD: ``f_target(Phi(x_{t_n}), t_{n-1})`` with the target = the online student under
     stop-gradient (``ema_rate = 0``, the paper) or an EMA copy; Direct CD: the stored endpoint;
  3. ``loss = E * odecm.objectives.consistency_loss(f_theta, ..., target=...)["loss"]`` (each member's
     gradient is its solo gradient);
  4. backward, gradient clipping per member, Adam (elementwise, so members stay independent), EMA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field
from tqdm.auto import tqdm

from odecm.config import StrictModel
from odecm.denoisers import Denoiser, NFECounter, index_cond
from odecm.objectives import (
    PrecomputedTarget,
    add_noise,
    consistency_loss,
    draw_indices,
)
from odecm.optim import warmup_then
from odecm.schedules import NoiseSchedule
from odecm.solvers import get_solver
from odecm.training import EMATarget

from .students import StudentEnsemble

Tensor = torch.Tensor

__all__ = ["TrainConfig", "TargetPool", "build_pool", "TrainHistory", "train_students"]


class TrainConfig(StrictModel):
    """How every student ensemble is distilled (method set per run)."""

    train_steps: int = Field(600, ge=1)
    batch_size: int = Field(16, ge=1, description="per member (the paper: 16)")
    lr: float = Field(1e-3, gt=0, description="scratch / mlp students")
    lora_lr: float = Field(1e-3, gt=0, description="lora students (adapters only)")
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(30, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = Field(1.0, gt=0, description="per-member gradient norm clip; null = off")
    ema_rate: float = Field(0.0, ge=0, lt=1, description="CD target EMA rate; 0 = online student under stop-gradient")
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    weighting: Literal["uniform", "snr", "karras"] = "uniform"
    pool_size: int = Field(4096, ge=16, description="training pairs per (teacher, solver, seed)")
    log_every: int = Field(25, ge=1)


@dataclass
class TargetPool:
    """P training rows with their teacher targets: ``x0, x_tn, x_prev, endpoint (P, ...)``, ``n, labels (P,)``."""

    x0: Tensor
    labels: Tensor | None
    n: Tensor
    x_tn: Tensor
    x_prev: Tensor
    endpoint: Tensor
    solver: str
    seconds: float = 0.0
    teacher_evals: int = 0

    @property
    def size(self) -> int:
        return self.x0.shape[0]


@torch.no_grad()
def build_pool(teacher: Denoiser, solver: str, grid: Tensor, data: Tensor, labels: Tensor | None, size: int, seed: int,
               dtype: torch.dtype = torch.float32, chunk: int = 4096, device: str = "cpu", progress: bool = False,
               store_dtype: torch.dtype = torch.float32) -> TargetPool:
    """Draw ``size`` rows from ``Generator(seed)`` (data index, then n ~ U{1..N}, then the noise), run
    the teacher's solver from each row's ``t_n`` to ``t_0`` in ``dtype`` (see module docstring) and store
    the rows in ``store_dtype``."""
    start = time.perf_counter()
    schedule = teacher.schedule
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(data.shape[0], (size,), generator=g)
    N = grid.numel() - 1
    n = draw_indices(size, N, "per_sample", generator=g)
    noise = torch.randn((size, *data.shape[1:]), generator=g, dtype=torch.float64)
    x0 = data[idx].double()
    lab = labels[idx] if labels is not None else None
    x_tn = add_noise(schedule, x0, grid[n], noise)
    step = get_solver(solver)
    counted = NFECounter(teacher)
    x_prev, ends = torch.empty_like(x_tn), torch.empty_like(x_tn)
    for i in tqdm(range(0, size, chunk), desc=f"pool {solver}", disable=not progress, leave=False):
        sl = slice(i, i + chunk)
        x, nn_ = x_tn[sl].to(device=device, dtype=dtype, copy=True), n[sl].to(device)
        cond = None if lab is None else lab[sl].to(device)
        first = torch.empty_like(x)
        for k in range(int(nn_.max()), 0, -1):
            active = (nn_ >= k).nonzero(as_tuple=True)[0]
            t_from = grid[k].to(device=device, dtype=dtype).expand(active.numel())
            t_to = grid[k - 1].to(device=device, dtype=dtype).expand(active.numel())
            x[active] = step.step(counted, x[active], t_from, t_to, index_cond(cond, active))
            started = (nn_ == k).nonzero(as_tuple=True)[0]
            first[started] = x[started]
        x_prev[sl], ends[sl] = first.double().cpu(), x.double().cpu()
    cast = lambda v: v.to(store_dtype)  # noqa: E731
    return TargetPool(cast(x0), lab, n, cast(x_tn), cast(x_prev), cast(ends), solver, time.perf_counter() - start,
                      counted.evals)


@dataclass
class TrainHistory:
    """Per logged step: per-member weighted loss ``(E,)`` and gradient norm ``(E,)``."""

    step: list[int] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0  # training only (budget evaluations excluded)
    eval_seconds: float = 0.0

    def window_mean(self, lo: float, hi: float) -> list[float]:
        """Per-member mean loss over the logged steps in ``[lo, hi)`` (fractions of the run)."""
        if not self.step:
            return []
        last = self.step[-1] + 1
        rows = [l for s, l in zip(self.step, self.loss) if lo * last <= s < hi * last] or self.loss[-1:]
        return torch.tensor(rows).mean(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm, "seconds": self.seconds,
                "eval_seconds": self.eval_seconds}


def train_students(method: str, cfg: TrainConfig, student: StudentEnsemble, pools: Sequence[TargetPool], grid: Tensor,
                   schedule: NoiseSchedule, on_budget: Callable[[int, StudentEnsemble], None] | None = None,
                   budgets: Sequence[int] = (), device: str = "cpu", progress: bool | str = False) -> TrainHistory:
    """Distil every member in place; member m draws from ``pools[m]`` with ``Generator(seeds[m])``.
    ``on_budget(step, student)`` runs after the steps listed in ``budgets`` (counted from 1)."""
    if method not in ("cd", "direct_cd"):
        raise ValueError(f"method={method!r}; allowed: 'cd', 'direct_cd'")
    E, B = student.num_members, cfg.batch_size
    if len(pools) != E:
        raise ValueError(f"{len(pools)} pools for {E} members")
    gens = [torch.Generator().manual_seed(int(s)) for s in student.seeds]
    params = [student.trainable(m) for m in range(E)]
    lr = cfg.lora_lr if student.kind == "lora" else cfg.lr
    opt = torch.optim.Adam([p for ps in params for p in ps], lr=lr, betas=cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(cfg.lr_schedule, cfg.warmup_steps, cfg.train_steps))
    target = EMATarget(student.f, cfg.ema_rate if method == "cd" else 0.0)
    dtype = next(student.stack.parameters()).dtype
    conditional = pools[0].labels is not None
    hist = TrainHistory()
    budgets = set(int(b) for b in budgets)
    start = time.perf_counter()
    bar = tqdm(range(cfg.train_steps), desc=progress if isinstance(progress, str) else method,
               disable=not progress, leave=False, mininterval=2.0)
    student.stack.train()
    for step in bar:
        # 1. per-member rows of the member's own pool
        rows = [torch.randint(p.size, (B,), generator=g) for p, g in zip(pools, gens)]
        take = lambda name: torch.cat([getattr(p, name)[r] for p, r in zip(pools, rows)]).to(device=device)  # noqa: E731
        x0, n, x_tn = take("x0").to(dtype), take("n"), take("x_tn").to(dtype)
        cond = take("labels") if conditional else None
        # 2. target (no gradient)
        if method == "cd":
            t_prev = grid.to(device=device, dtype=dtype)[n - 1]
            value = target(take("x_prev").to(dtype), t_prev, cond)
        else:
            value = take("endpoint").to(dtype)
        # 3. odecm's consistency loss with the target given
        out = consistency_loss(student.f, PrecomputedTarget(), x0, n, grid, schedule, cond=cond, x_tn=x_tn,
                               target=value, distance=cfg.distance, weighting=cfg.weighting, share_randomness=False)
        loss = E * out["loss"]
        # 4. update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms = [torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip if cfg.grad_clip else float("inf")) for ps in params]
        opt.step()
        sched.step()
        target.update()
        if step % cfg.log_every == 0 or step == cfg.train_steps - 1:
            with torch.no_grad():
                per = (out["weights"] * out["per_sample"]).reshape(E, B).mean(1)
            hist.step.append(step)
            hist.loss.append(per.tolist())
            hist.grad_norm.append(torch.stack(norms).tolist())  # read on logged steps only (one device sync)
            if progress:
                bar.set_postfix(loss=f"{float(per.mean()):.3g}")
        if on_budget is not None and (step + 1) in budgets:
            tick = time.perf_counter()
            student.stack.eval()
            on_budget(step + 1, student)
            student.stack.train()
            hist.eval_seconds += time.perf_counter() - tick
    student.stack.eval()
    hist.seconds = time.perf_counter() - start - hist.eval_seconds
    return hist
