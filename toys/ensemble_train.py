"""Training batched ensembles: the CD / k-step / Direct CD loop, evaluation along training, NaN guard.

``train_ensemble(cfg, student, routes, grid, sample_data)`` distils into every member of an
``toys.ensemble.EnsembleStudent`` in place. The target is chosen by ``TrainConfig``:

* ``method="cd"``: one teacher step, then the target network (``ema_rate`` 0 = the online student
  under stop-gradient, the paper's choice; > 0 = an EMA copy);
* ``method="direct_cd"``: the teacher solver down to ``t_0`` (the pool's stored endpoints);
* ``method="cd_k"`` with ``k``: k teacher steps, then the target network (``k=1`` is CD, ``k="all"``
  is Direct CD; tested to give the same loss values on the same batch);
* ``direct_first_steps = P > 0``: the first P steps regress on the Direct CD target, the rest use
  ``method`` (CD as a fine-tuner of a Direct-CD-initialised student); one optimizer and one learning
  rate schedule run through both phases.

``eval_steps`` + ``on_eval(step, student, ema)`` evaluate the students along training: after
``step`` optimizer steps (1-based) the callback sees the online ensemble and, for an EMA target, an
``EnsembleStudent`` view of the EMA weights (None otherwise). With ``lr_schedule="constant"`` (after
warm-up) a point on such a curve means the same as a run of that length.

NaN/inf guard (policy: **stop**). After every backward pass each member's loss and gradient norm are
checked; the first member whose loss or gradient is non-finite stops the run with
``NonFiniteTrainingError`` naming the member, its seeds and route, the step and the value. Members are
trained jointly, so freezing one would silently change the batch statistics of the run's report;
stopping keeps every reported student a fully trained one. ``init_from_teacher`` has the same guard.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from einops import rearrange
from tqdm.auto import tqdm

from odecm.objectives import add_noise, consistency_loss, draw_indices, get_distance
from odecm.optim import warmup_then
from odecm.training import EMATarget

from .ensemble_config import TrainConfig, TrainHistory
from .ensemble_targets import DataSampler, Route, RoutedTarget

if TYPE_CHECKING:  # toys.ensemble imports this module; no runtime import back
    from .ensemble import EnsembleStudent

Tensor = torch.Tensor

__all__ = [
    "NonFiniteTrainingError",
    "member_norms",
    "clip_grad_norm_per_member",
    "Batch",
    "draw_batch",
    "ensemble_loss",
    "train_ensemble",
    "init_from_teacher",
]


class NonFiniteTrainingError(FloatingPointError):
    """A member's loss or gradient became NaN/inf; ``member``, ``step`` (0-based), ``kind`` ("loss" or
    "gradient") and ``value`` say which and where."""

    def __init__(self, message: str, member: int, step: int, kind: str, value: float):
        super().__init__(message)
        self.member, self.step, self.kind, self.value = member, step, kind, value


# --- per-member gradients ---------------------------------------------------------------------------

def member_norms(params: Sequence[Tensor]) -> Tensor:
    """Per-member gradient norms ``||g_m||`` (leading dim E of every gradient): ``(E,)``."""
    grads = [p.grad for p in params if p.grad is not None]
    return sum(rearrange(g, "e ... -> e (...)").pow(2).sum(1) for g in grads).sqrt()


def clip_grad_norm_per_member(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """torch's ``clip_grad_norm_`` applied to each member's slice (leading dim E) separately:
    ``g_m <- g_m * min(1, max_norm / (||g_m|| + 1e-6))``. Returns the per-member norms ``(E,)``."""
    norms = member_norms(params)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.reshape(-1, *([1] * (p.grad.dim() - 1))))
    return norms


def _check_finite(kind: str, values: Tensor, step: int, seeds: Sequence[int], batch_seeds: Sequence[int],
                  routes: Sequence[Route], lr: float) -> None:
    bad = (~torch.isfinite(values)).nonzero(as_tuple=True)[0]
    if bad.numel():
        m = int(bad[0])
        route = routes[m]
        where = f"teacher {route.label or type(route.teacher).__name__}, solver {route.solver}"
        raise NonFiniteTrainingError(
            f"member {m} (init seed {seeds[m]}, batch seed {batch_seeds[m]}; {where}): non-finite {kind} "
            f"{float(values[m])} at step {step}; {bad.numel()} of {values.numel()} members affected; training "
            f"stopped (lr={lr:g}: lower train.lr, or check the teacher)", m, step, kind, float(values[m]))


# --- batches and the loss ---------------------------------------------------------------------------

@dataclass
class Batch:
    """A member-major batch: ``x0, x_tn (E*B, d)``, ``n (E*B,)`` and, from a pool, the Direct CD
    ``endpoint`` of each row (None for fresh data)."""

    x0: Tensor
    n: Tensor
    x_tn: Tensor
    endpoint: Tensor | None


def draw_batch(cfg: TrainConfig, routes: Sequence[Route], gens: Sequence[torch.Generator], grid: Tensor,
               schedule, sample_data: DataSampler, dtype: torch.dtype) -> Batch:
    """Member m draws B rows with ``gens[m]``: indices into its route's pool (``data="pool"``), or fresh
    ``x0 ~ sample_data``, ``n ~ draw_indices(index_scheme)``, ``noise ~ N(0, I)`` (``data="fresh"``)."""
    B = cfg.batch_size
    if cfg.data == "pool":
        parts = [(r.pool, torch.randint(r.pool.size, (B,), generator=g)) for r, g in zip(routes, gens)]
        return Batch(torch.cat([p.x0[i] for p, i in parts]).to(dtype), torch.cat([p.n[i] for p, i in parts]),
                     torch.cat([p.x_tn[i] for p, i in parts]).to(dtype),
                     torch.cat([p.endpoint[i] for p, i in parts]).to(dtype))
    N = grid.numel() - 1
    x0 = torch.cat([sample_data(B, g).to(dtype) for g in gens])
    n = torch.cat([draw_indices(B, N, cfg.index_scheme, generator=g) for g in gens])
    noise = torch.cat([torch.randn((B, x0.shape[1]), generator=g, dtype=dtype) for g in gens])
    return Batch(x0, n, add_noise(schedule, x0, grid[n].to(dtype), noise), None)


def ensemble_loss(cfg: TrainConfig, student: "EnsembleStudent", provider: RoutedTarget | None, batch: Batch,
                  grid: Tensor, direct: bool = False) -> dict[str, Any]:
    """``odecm.objectives.consistency_loss`` on a member-major batch: the Direct CD target is the
    batch's stored ``endpoint`` when ``direct`` and the batch has one, else ``provider``'s target.
    Adds ``member_loss (E,)`` (each member's weighted mean) and ``loss`` = their sum (so each member's
    gradient is its solo gradient)."""
    distance: Any = get_distance("pseudo_huber", c=cfg.huber_c) if cfg.distance == "pseudo_huber" else cfg.distance
    stored = batch.endpoint if direct else None
    if stored is None and provider is None:
        raise ValueError("no target: pass a provider, or a batch with stored endpoints for Direct CD")
    out = consistency_loss(student.f, provider, batch.x0, batch.n, grid, student.denoiser.schedule,
                           x_tn=batch.x_tn, target=stored, distance=distance, weighting=cfg.weighting,
                           share_randomness=False)
    E = student.num_members
    out["member_loss"] = rearrange(out["weights"] * out["per_sample"], "(e b) -> e b", e=E).mean(1)
    out["loss"] = E * out["loss"]
    return out


def _ema_view(student: "EnsembleStudent", target: EMATarget) -> "EnsembleStudent | None":
    if target.module is None:
        return None
    f = target.module
    return type(student)(f.denoiser.net, f.denoiser, f, list(student.seeds))


def _check_routes(cfg: TrainConfig, routes: Sequence[Route]) -> None:
    if cfg.data != "pool":
        return
    for m, r in enumerate(routes):
        if r.pool is None:
            raise ValueError(f"member {m}: data='pool' needs a TargetPool on every route (TargetPool.build) "
                             "— or set data='fresh'")
        if r.pool.solver != r.solver:
            raise ValueError(f"member {m}: pool was built with solver {r.pool.solver!r}, the route uses {r.solver!r}")


def train_ensemble(
    train: TrainConfig,
    student: "EnsembleStudent",
    routes: Route | Sequence[Route],
    grid: Tensor,
    sample_data: DataSampler,
    progress: bool | str = True,
    batch_seeds: Sequence[int] | None = None,
    eval_steps: Sequence[int] = (),
    on_eval: Callable[[int, "EnsembleStudent", "EnsembleStudent | None"], None] | None = None,
) -> TrainHistory:
    """Distil into every member of ``student`` in place; member m learns from ``routes[m]`` (its
    teacher through its solver on ``grid``; one ``Route`` serves all members) and draws its batches
    from ``Generator(batch_seeds[m])`` (default: its initialisation seed).

    Each step (the paper's Algorithm, per member m):
      1. draw B pairs (x0, n, x_tn) (``draw_batch``), concatenated member-major;
      2. target: Direct CD (first ``direct_first_steps`` steps, or ``method="direct_cd"``) — the pool's
         endpoint (``DirectCDTarget`` on fresh data); CD / k-step CD — ``RoutedTarget``: k teacher
         steps, then the target network (EMA of the student with rate ``ema_rate``, or the student
         itself under stop-gradient when 0);
      3. ``loss = sum_m member_loss_m`` (``ensemble_loss``);
      4. backward; guard (non-finite loss or gradient norm of any member stops the run); per-member
         clip; Adam step (elementwise, so members stay independent); lr schedule; EMA update;
      5. after ``step + 1`` steps in ``eval_steps``: ``on_eval(step + 1, student, ema_view)``.
    """
    cfg = train
    E = student.num_members
    routes = [routes] * E if isinstance(routes, Route) else list(routes)
    if len(routes) != E:
        raise ValueError(f"{len(routes)} routes for {E} members")
    _check_routes(cfg, routes)
    batch_seeds = list(student.seeds if batch_seeds is None else batch_seeds)
    if len(batch_seeds) != E:
        raise ValueError(f"{len(batch_seeds)} batch seeds for {E} members")
    eval_at = sorted({int(s) for s in eval_steps})
    if eval_at and (eval_at[0] < 1 or eval_at[-1] > cfg.train_steps):
        raise ValueError(f"eval_steps must lie in 1..train_steps={cfg.train_steps}, got {eval_at}")
    N = grid.numel() - 1
    dtype = student.net.weights[0].dtype
    schedule = student.denoiser.schedule
    gens = [torch.Generator().manual_seed(int(s)) for s in batch_seeds]

    # odecm's target policy: EMA copy (rate mu, elementwise, hence per member) or the online student
    uses_target = cfg.method != "direct_cd"
    target = EMATarget(student.f, cfg.ema_rate if uses_target else 0.0)
    main = RoutedTarget(cfg.method, routes, cfg.batch_size, grid, target_fn=target, k=cfg.k_steps(N))
    direct = RoutedTarget("direct_cd", routes, cfg.batch_size, grid) if cfg.data == "fresh" else None

    params = list(student.net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then(cfg.lr_schedule, cfg.warmup_steps, cfg.train_steps))

    hist = TrainHistory()
    start = time.perf_counter()
    bar = tqdm(range(cfg.train_steps), desc=progress if isinstance(progress, str) else cfg.method,
               disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        phase_direct = cfg.method == "direct_cd" or step < cfg.direct_first_steps
        # 1. per-member draws
        batch = draw_batch(cfg, routes, gens, grid, schedule, sample_data, dtype)
        # 2-3. target and loss (odecm's one CD / Direct CD loss on the flattened batch)
        provider = (direct if phase_direct else main)
        out = ensemble_loss(cfg, student, provider, batch, grid, direct=phase_direct)
        # 4. update, with the per-member guard
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        member_loss = out["member_loss"].detach()
        _check_finite("loss", member_loss, step, student.seeds, batch_seeds, routes, cfg.lr)
        norms = clip_grad_norm_per_member(params, cfg.grad_clip) if cfg.grad_clip is not None else member_norms(params)
        _check_finite("gradient norm", norms, step, student.seeds, batch_seeds, routes, cfg.lr)
        opt.step()
        sched.step()
        target.update()
        hist.teacher_evals += int(out["target_evals"])
        if step % cfg.log_every == 0 or step == cfg.train_steps - 1:
            hist.step.append(step)
            hist.loss.append(member_loss.tolist())
            hist.grad_norm.append(norms.tolist())
            hist.phase.append("direct_cd" if phase_direct else cfg.method)
            if progress:
                bar.set_postfix(loss=f"{float(member_loss.mean()):.3g}")
        # 5. evaluation along training
        if on_eval is not None and eval_at and step + 1 == eval_at[0]:
            eval_at.pop(0)
            on_eval(step + 1, student, _ema_view(student, target))
    hist.seconds = time.perf_counter() - start
    return hist


def init_from_teacher(
    student: "EnsembleStudent",
    routes: Route | Sequence[Route],
    grid: Tensor,
    sample_data: DataSampler,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    progress: bool | str = False,
    batch_seeds: Sequence[int] | None = None,
) -> TrainHistory:
    """Start each member as its teacher's denoiser (the toy analogue of the paper's student, which
    starts from the teacher's weights): regress ``x0_hat_student(x_{t_n}, t_n)`` on
    ``x0_hat_teacher(x_{t_n}, t_n)``, ``n ~ U{1..N}``, ``x_{t_n} = alpha x0 + sigma eps`` (plain MSE,
    Adam, cosine decay). Member m draws from ``Generator(batch_seeds[m] + 7919)`` (default batch seeds:
    the initialisation seeds; independent of the distillation stream) and learns from
    ``routes[m].teacher``. The same per-member NaN/inf guard as ``train_ensemble``."""
    E = student.num_members
    routes = [routes] * E if isinstance(routes, Route) else list(routes)
    if len(routes) != E:
        raise ValueError(f"{len(routes)} routes for {E} members")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"init lr={lr!r}; allowed: finite, > 0")
    batch_seeds = list(student.seeds if batch_seeds is None else batch_seeds)
    schedule = student.denoiser.schedule
    dtype = student.net.weights[0].dtype
    N = grid.numel() - 1
    gens = [torch.Generator().manual_seed(int(s) + 7919) for s in batch_seeds]
    groups: dict[int, list[int]] = {}
    for m, r in enumerate(routes):
        groups.setdefault(id(r.teacher), []).append(m)
    B = batch_size
    rows = {k: torch.cat([torch.arange(m * B, (m + 1) * B) for m in ms]) for k, ms in groups.items()}
    params = list(student.net.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(1, steps))))
    hist = TrainHistory()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=progress if isinstance(progress, str) else "init", disable=not progress,
                     leave=False, mininterval=1.0):
        x0 = torch.cat([sample_data(B, g).to(dtype) for g in gens])
        n = torch.cat([torch.randint(1, N + 1, (B,), generator=g) for g in gens])
        noise = torch.cat([torch.randn((B, x0.shape[1]), generator=g, dtype=dtype) for g in gens])
        t = grid.to(dtype)[n]
        x_t = add_noise(schedule, x0, t, noise)
        with torch.no_grad():
            target = torch.empty_like(x_t)
            for k, ms in groups.items():
                r = rows[k]
                target[r] = routes[ms[0]].teacher(x_t[r], t[r]).x0.to(dtype)
        per_sample = ((student.denoiser(x_t, t).x0 - target) ** 2).mean(1)
        member_loss = rearrange(per_sample, "(e b) -> e b", e=E).mean(1)
        opt.zero_grad(set_to_none=True)
        member_loss.sum().backward()
        _check_finite("init loss", member_loss.detach(), step, student.seeds, batch_seeds, routes, lr)
        _check_finite("init gradient norm", member_norms(params), step, student.seeds, batch_seeds, routes, lr)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            hist.step.append(step)
            hist.loss.append(member_loss.detach().tolist())
            hist.phase.append("init")
    hist.seconds = time.perf_counter() - start
    return hist
