"""Batched ensembles of MLP students: E independent members trained at once.

Layout
------
``EnsembleMLP`` stacks E MLPs of one shape (``toys.networks.MLP``): layer ``l`` holds
``weight (E, fan_in, fan_out)`` and ``bias (E, 1, fan_out)``, and the embedding frequencies are
``freqs (E, 1, F)``. Its input is **member-major**: ``x (E*B, d)``, ``u (E*B,)``, rows
``m*B .. (m+1)*B - 1`` belonging to member m. Internally ``h (E, B, .) = baddbmm(bias, h, weight)``,
so one batched matmul per layer serves every member. Wrapped in ``toys.networks.MLPDenoiser`` and
``odecm.consistency.ConsistencyFunction`` it is an ordinary odecm student, and
``odecm.objectives.consistency_loss`` runs unchanged on the flattened batch.

Independence
------------
* loss: ``sum_m mean_{b in member m} lambda d(.)`` = ``E * consistency_loss(...)["loss"]`` (equal B per
  member), so each member's gradient is exactly its solo gradient;
* Adam is elementwise, EMA targets are elementwise, gradient clipping is done **per member**
  (``clip_grad_norm_per_member``, torch's ``clip_grad_norm_`` rule on each member's slice);
* data: member m draws its pairs from its own ``torch.Generator(seed_m)`` (fresh samples or rows of
  a shared pool), and its weights are initialised from ``Generator(seed_m)`` exactly as
  ``toys.networks.make_student(seed=seed_m)`` would.

Hence training an ensemble gives, member by member, the result of training that member alone with
the same seed (tested: exact up to float rounding, ``tests/test_ensemble.py``).

Direct CD target pool
---------------------
Direct CD targets ``f_solver(x_{t_n}, t_n, 0)`` do not depend on the student, so ``TargetPool.build``
precomputes P tuples ``(x0, noise, n, x_tn, endpoint)`` once per (teacher, solver, grid) and every
member/method draws rows from it (``data="pool"``; CD then uses the same training pairs and only
computes its one-step teacher move and target online). Cost: about ``P (N + 1) / 2`` teacher
sample evaluations (x2 for Heun). With ``train_steps * batch_size`` draws per member each row is reused
about ``steps * batch_size / P`` times (default 4000 * 256 / 2^17 ~ 8); ``pool_size`` large against
the student's capacity keeps this harmless in 2D (``data="fresh"`` trains on fresh samples with the
online ``DirectCDTarget`` for comparison). ``studies.score_error``: 1500 * 128 / 2^16 ~ 3 reuses.

Routes
------
``Route(teacher, solver, pool)`` per member: members of one ensemble may distil different
teachers through different solvers. ``RoutedTarget`` groups the rows of members sharing a route
(one teacher call per route and step, built on ``odecm.objectives.CDTarget`` / ``DirectCDTarget``)
and runs the CD target network once on the whole batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from odecm.config import StrictModel
from odecm.consistency import ConsistencyFunction, make_boundary
from odecm.denoisers import Denoiser, index_cond
from odecm.objectives import (CDTarget, DirectCDTarget, TargetOut, add_noise, consistency_loss, draw_indices,
                              get_distance)
from odecm.schedules import NoiseSchedule
from odecm.solvers import get_solver, solve
from odecm.training import EMATarget

from .networks import ACTIVATIONS, MLP, MLPDenoiser, NetworkConfig, time_features

Tensor = torch.Tensor
DataSampler = Callable[[int, torch.Generator], Tensor]

__all__ = [
    "EnsembleMLP",
    "EnsembleStudent",
    "make_ensemble_student",
    "TrainConfig",
    "TargetPool",
    "Route",
    "RoutedTarget",
    "clip_grad_norm_per_member",
    "train_ensemble",
    "init_from_teacher",
    "TrainHistory",
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

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        E = self.num_members
        if x.shape[0] % E:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of the ensemble size {E} (member-major layout)")
        B = x.shape[0] // E
        u = u.to(x.dtype).reshape(E, B, 1)
        h = torch.cat([x.reshape(E, B, -1), time_features(u, self.freqs.to(x.dtype))], dim=-1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = self.act(h)
        return h.reshape(E * B, -1)


@dataclass
class EnsembleStudent:
    """An ensemble as odecm objects: ``net`` (EnsembleMLP), ``denoiser`` (MLPDenoiser) and the
    consistency function ``f`` (``f(x (E*B, d), t, cond)``), plus the members' seeds."""

    net: EnsembleMLP
    denoiser: MLPDenoiser
    f: ConsistencyFunction
    seeds: list[int]

    @property
    def num_members(self) -> int:
        return self.net.num_members

    @torch.no_grad()
    def one_step(self, x_T: Tensor, t_T: float) -> Tensor:
        """Every member's one-step output ``f_m(x_T, T)`` from the same noise: ``(E, M, d)``."""
        E, M = self.num_members, x_T.shape[0]
        dtype = self.net.weights[0].dtype
        out = self.f(x_T.to(dtype).repeat(E, 1), torch.full((E * M,), float(t_T), dtype=dtype))
        return out.reshape(E, M, -1).to(x_T.dtype)

    def member_student(self, m: int) -> ConsistencyFunction:
        """Member m as a solo ``ConsistencyFunction(MLPDenoiser(MLP))`` with the same boundary."""
        den = MLPDenoiser(self.net.member(m), self.denoiser.schedule, self.denoiser.config)
        return ConsistencyFunction(den, self.f.boundary)


def make_ensemble_student(config: NetworkConfig, schedule: NoiseSchedule, seeds: Sequence[int],
                          boundary: str = "lcm", t_min: float | None = None,
                          dtype: torch.dtype = torch.float32) -> EnsembleStudent:
    """E = len(seeds) members, member m initialised from ``seeds[m]``; boundary ``lcm`` | ``edm``."""
    net = EnsembleMLP.from_seeds(config, seeds).to(dtype)
    den = MLPDenoiser(net, schedule, config)
    f = ConsistencyFunction(den, make_boundary(boundary, schedule, t_min=t_min))
    return EnsembleStudent(net, den, f, [int(s) for s in seeds])


def clip_grad_norm_per_member(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """torch's ``clip_grad_norm_`` applied to each member's slice (leading dim E) separately:
    ``g_m <- g_m * min(1, max_norm / (||g_m|| + 1e-6))``. Returns the per-member norms ``(E,)``."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *([1] * (g.dim() - 1))))
    return norms


class TrainConfig(StrictModel):
    """How one ensemble is distilled (shared by all members)."""

    renamed_keys = {"steps": "train_steps"}

    method: Literal["cd", "direct_cd"] = "cd"
    train_steps: int = Field(4000, ge=1, description="optimizer steps")
    batch_size: int = Field(256, ge=1, description="per member")
    lr: float = Field(2e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = Field(1.0, gt=0, description="per-member gradient norm clip; null = off")
    ema_rate: float = Field(0.0, ge=0, lt=1, description="target EMA rate mu; 0 = online student under stop-grad")
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    huber_c: float = Field(1e-3, gt=0)
    weighting: Literal["uniform", "snr", "karras"] = "uniform"
    index_scheme: Literal["per_sample", "shared"] = Field(
        "per_sample", description="n drawing for data='fresh' (pool rows always carry per-sample n)")
    data: Literal["pool", "fresh"] = Field("pool", description="pool: rows of a TargetPool; fresh: new samples")
    pool_size: int = Field(131072, ge=1)
    pool_seed: int = 12345
    log_every: int = Field(50, ge=1)


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
        return cls(x0, noise, n, x_tn, torch.cat(ends), solver, time.perf_counter() - start, evals)


@dataclass
class TrainHistory:
    """Logged every ``log_every`` steps: ``step``, per-member ``loss`` (E,) and ``grad_norm`` (E,),
    plus wall time and the teacher's sample evaluations spent during training."""

    step: list[int] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    teacher_evals: int = 0

    def final_loss(self, window: int = 5) -> list[float]:
        """Per-member mean of the last ``window`` logged losses."""
        rows = torch.tensor(self.loss[-window:])
        return rows.mean(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm,
                "seconds": self.seconds, "teacher_evals": self.teacher_evals}


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            prog = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
        return 1.0
    return f


@dataclass(frozen=True)
class Route:
    """Where member m's targets come from: its ``teacher``, ``solver`` and (for ``data="pool"``)
    the ``TargetPool`` of that (teacher, solver). Members sharing a route share teacher calls."""

    teacher: Denoiser
    solver: str
    pool: TargetPool | None = None


def _identity_target(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    return x


class RoutedTarget:
    """CD / Direct CD target provider for a member-major batch ``(E*B, d)`` whose members may use
    different (teacher, solver) routes.

    CD: for each route, ``odecm.objectives.CDTarget(teacher, solver, grid, identity)`` gives the
    teacher's move ``x_{t_{n-1}} = Phi(x_{t_n}, t_n, t_{n-1})`` on that route's rows; then the target
    network runs once on the whole batch: ``target = f_target(x_{t_{n-1}}, t_{n-1})``.
    Direct CD (fresh data): ``odecm.objectives.DirectCDTarget`` per route."""

    def __init__(self, method: str, routes: Sequence[Route], batch_size: int, grid: Tensor,
                 target_fn: Callable[..., Tensor] | None = None):
        if method not in ("cd", "direct_cd"):
            raise ValueError(f"method={method!r}; allowed: 'cd', 'direct_cd'")
        self.method, self.grid, self.target_fn = method, grid, target_fn
        self.groups: list[tuple[Tensor, Any]] = []
        keys: dict[tuple[int, str], list[int]] = {}
        for m, r in enumerate(routes):
            keys.setdefault((id(r.teacher), r.solver), []).append(m)
        for members in keys.values():
            r = routes[members[0]]
            rows: Any = torch.cat([torch.arange(m * batch_size, (m + 1) * batch_size) for m in members])
            if members == list(range(members[0], members[-1] + 1)):  # contiguous block: a cheap slice
                rows = slice(members[0] * batch_size, (members[-1] + 1) * batch_size)
            if method == "cd":
                prov = CDTarget(r.teacher, r.solver, grid, target_fn=_identity_target)
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
                out = prov(x_tn[rows], n[rows], index_cond(cond, rows))
                value[rows] = out.value
                calls, evals, steps = calls + out.calls, evals + out.evals, max(steps, out.steps)
        if self.method == "cd":
            t_prev = self.grid.to(x_tn.dtype)[n - 1]
            value = self.target_fn(value, t_prev, cond)
        return TargetOut(value.detach(), calls, evals, steps)


def train_ensemble(
    train: TrainConfig,
    student: EnsembleStudent,
    routes: Route | Sequence[Route],
    grid: Tensor,
    sample_data: DataSampler,
    progress: bool | str = True,
) -> TrainHistory:
    """Distil into every member of ``student`` in place; member m learns from ``routes[m]`` (its
    teacher through its solver on ``grid``; one ``Route`` serves all members).

    Each step (the paper's Algorithm, per member m with its own generator g_m):
      1. draw B pairs (x0, n, noise): rows of the route's pool (``data="pool"``) or fresh (x0 ~
         sample_data, n ~ draw_indices(index_scheme), noise ~ N(0, I)), concatenated member-major;
      2. target: CD — one teacher step t_n -> t_{n-1}, then the target network (EMA of the student
         with rate ``ema_rate``, or the student itself under stop-gradient when 0); Direct CD — the
         pool's endpoint (or ``DirectCDTarget`` on fresh data);
      3. ``loss = E * consistency_loss(...)["loss"]`` = sum of the members' mean losses;
      4. backward, per-member clip, Adam step (elementwise, so members stay independent), EMA update.
    """
    cfg = train
    schedule = student.denoiser.schedule
    E = student.num_members
    routes = [routes] * E if isinstance(routes, Route) else list(routes)
    if len(routes) != E:
        raise ValueError(f"{len(routes)} routes for {E} members")
    N = grid.numel() - 1
    dtype = student.net.weights[0].dtype
    if cfg.data == "pool":
        for r in routes:
            if r.pool is None:
                raise ValueError("data='pool' needs a TargetPool on every route (TargetPool.build) — or set data='fresh'")
            if r.pool.solver != r.solver:
                raise ValueError(f"pool was built with solver {r.pool.solver!r}, the route uses {r.solver!r}")
    gens = [torch.Generator().manual_seed(int(s)) for s in student.seeds]

    # odecm's target policy: EMA copy (rate mu, elementwise, hence per member) or the online student
    target = EMATarget(student.f, cfg.ema_rate if cfg.method == "cd" else 0.0)
    B = cfg.batch_size
    provider = RoutedTarget(cfg.method, routes, B, grid, target_fn=target)

    params = list(student.net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    distance: Any = get_distance("pseudo_huber", c=cfg.huber_c) if cfg.distance == "pseudo_huber" else cfg.distance

    hist = TrainHistory()
    start = time.perf_counter()
    bar = tqdm(range(cfg.train_steps), desc=progress if isinstance(progress, str) else cfg.method,
               disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        # 1. per-member draws
        if cfg.data == "pool":
            parts = [(r.pool, torch.randint(r.pool.size, (B,), generator=g)) for r, g in zip(routes, gens)]
            x0 = torch.cat([p.x0[i] for p, i in parts]).to(dtype)
            n = torch.cat([p.n[i] for p, i in parts])
            x_tn = torch.cat([p.x_tn[i] for p, i in parts]).to(dtype)
            stored = torch.cat([p.endpoint[i] for p, i in parts]).to(dtype) if cfg.method == "direct_cd" else None
        else:
            x0 = torch.cat([sample_data(B, g).to(dtype) for g in gens])
            n = torch.cat([draw_indices(B, N, cfg.index_scheme, generator=g) for g in gens])
            noise = torch.cat([torch.randn((B, x0.shape[1]), generator=g, dtype=dtype) for g in gens])
            x_tn = add_noise(schedule, x0, grid[n].to(dtype), noise)
            stored = None
        # 2-3. target and loss (odecm's one CD / Direct CD loss on the flattened batch)
        out = consistency_loss(student.f, provider, x0, n, grid, schedule, x_tn=x_tn, target=stored,
                               distance=distance, weighting=cfg.weighting, share_randomness=False)
        loss = E * out["loss"]
        # 4. update
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms = clip_grad_norm_per_member(params, cfg.grad_clip) if cfg.grad_clip is not None else torch.zeros(E)
        opt.step()
        sched.step()
        target.update()
        hist.teacher_evals += int(out["target_evals"])
        if step % cfg.log_every == 0 or step == cfg.train_steps - 1:
            with torch.no_grad():
                w_ps = (out["weights"] * out["per_sample"]).reshape(E, B).mean(1)
            hist.step.append(step)
            hist.loss.append(w_ps.tolist())
            hist.grad_norm.append(norms.tolist())
            if progress:
                bar.set_postfix(loss=f"{float(w_ps.mean()):.3g}")
    hist.seconds = time.perf_counter() - start
    return hist


def init_from_teacher(
    student: EnsembleStudent,
    routes: Route | Sequence[Route],
    grid: Tensor,
    sample_data: DataSampler,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    progress: bool | str = False,
) -> TrainHistory:
    """Start each member as its teacher's denoiser (the toy analogue of the paper's student, which
    starts from the teacher's weights): regress ``x0_hat_student(x_{t_n}, t_n)`` on
    ``x0_hat_teacher(x_{t_n}, t_n)``, ``n ~ U{0..N}``, ``x_{t_n} = alpha x0 + sigma eps`` (plain MSE,
    Adam, cosine decay). Member m draws from ``Generator(seeds[m] + 7919)`` (independent of its
    distillation stream) and learns from ``routes[m].teacher``."""
    E = student.num_members
    routes = [routes] * E if isinstance(routes, Route) else list(routes)
    schedule = student.denoiser.schedule
    dtype = student.net.weights[0].dtype
    N = grid.numel() - 1
    gens = [torch.Generator().manual_seed(int(s) + 7919) for s in student.seeds]
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
        n = torch.cat([torch.randint(0, N + 1, (B,), generator=g) for g in gens])
        noise = torch.cat([torch.randn((B, x0.shape[1]), generator=g, dtype=dtype) for g in gens])
        t = grid.to(dtype)[n]
        x_t = add_noise(schedule, x0, t, noise)
        with torch.no_grad():
            target = torch.empty_like(x_t)
            for k, ms in groups.items():
                r = rows[k]
                target[r] = routes[ms[0]].teacher(x_t[r], t[r]).x0.to(dtype)
        per_sample = ((student.denoiser(x_t, t).x0 - target) ** 2).mean(1)
        loss = per_sample.reshape(E, B).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            hist.step.append(step)
            hist.loss.append(per_sample.detach().reshape(E, B).mean(1).tolist())
    hist.seconds = time.perf_counter() - start
    return hist
