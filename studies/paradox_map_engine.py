"""studies.paradox_map, the engine: the map's cells, its worlds, the batched trainings and their evaluation.

* ``plan_map(cfg)``: every cell (row x col) resolved to its world ``(knob, dim, n_modes)``, student shape
  ``(width, depth, dim)``, compared method and budget; cells are grouped into **trainings**, one per
  (shape, method): members = the worlds of its cells x seeds (route axes share an ensemble), evaluated at
  every budget of its cells (and at half of each, for the convergence flag) along one run.
* ``Worlds``: the data mixtures, teachers, per-seed evaluation data (noise ``x_T`` and the teacher
  solver's chain from it, a p_0 reference, the teacher's samples) and Direct CD pools, each built once.
* ``run_trainings``: trains every ensemble and records, per member and evaluation step, ``E_solver``
  (eq. 6) and at budgets ``w2_teacher`` / ``w2_p0``.
* ``world_floors``: W2 floors per world (two independent samples of the same distribution, >= 10 draws).

Methods of a cell: its ``base`` (the ``cd`` side: CD, k = 1, the online student under stop-gradient; on a
``direct_first`` axis ``("direct_first", P)``: P Direct CD steps, then CD, P = 0 being CD itself) and its
compared ``method``: ``direct_cd`` (k = all, or k >= N: every row of the target reaches t_0 through the
solver, the trainer's Direct CD guarantee) or ``("cd_k", k)``. The CD training of a shape is shared by
every k of that shape, the Direct CD training by every P.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from odecm.grids import make_grid
from odecm.metrics import per_sample_sq_error
from odecm.solvers import solve
from toys.ensemble import Route, TargetPool, make_ensemble_student, train_ensemble
from toys.gmm import ExactGMMDenoiser
from toys.metrics import wasserstein2
from toys.scores import make_teacher, score_error

from . import evidence
from .cells import log, make_world_schedule

Tensor = torch.Tensor
STUDY = "paradox_map"

__all__ = ["Cell", "Training", "MapPlan", "plan_map", "method_of", "base_of", "Worlds", "MapResults", "run_trainings",
           "world_floors", "w2", "world_label"]

EXACT_TOL = 1e-10  # measured score errors below this are float rounding (wrong_gmm δ = 0 is the exact teacher)
CD = ("cd", None)
DIRECT = ("direct_cd", None)


def method_of(k: int | str, grid_size: int) -> tuple[str, int | None]:
    """The trained method of the comparison's k: ``("cd", None)`` for k = 1, ``("direct_cd", None)`` for
    k = 'all' or k >= N, else ``("cd_k", k)``."""
    if k == 1:
        return CD
    if k == "all" or int(k) >= grid_size:
        return DIRECT
    return ("cd_k", int(k))


def base_of(direct_first: int) -> tuple[str, int | None]:
    """The ``cd`` side of a cell: CD, or for P = ``direct_first`` > 0 the two-phase student
    ``("direct_first", P)`` (P steps of Direct CD, then CD; ``TrainConfig.direct_first_steps``)."""
    return CD if not direct_first else ("direct_first", int(direct_first))


def world_label(key: tuple, kind: str) -> str:
    knob, dim, n_modes = key
    name = {"wrong_gmm": "δ", "nonconservative": "δ", "learned": "budget"}.get(kind)
    parts = [f"{kind}" + (f" {name}={knob:g}" if name else "")] + [f"d={dim}"]
    if n_modes is not None:
        parts.append(f"K={n_modes}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Cell:
    """One cell: its position, axis values (``params``) and everything they resolve to."""

    row: int
    col: int
    params: dict
    knob: float | None
    dim: int
    n_modes: int | None
    width: int
    depth: int
    k: int | str
    budget: int
    method: tuple[str, int | None]
    base: tuple[str, int | None] = CD

    @property
    def world(self) -> tuple:
        return (self.knob, self.dim, self.n_modes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.width, self.depth, self.dim)

    @property
    def reference(self) -> bool:
        """k = 1: the compared student is the CD student itself (difference 0 by construction)."""
        return self.method == self.base

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Training:
    """One batched ensemble: ``method`` on student ``shape``; members = ``worlds`` x seeds (world-major);
    E is read at every budget, half of each (convergence) and at ``switches`` (the step P where a
    two-phase student of the map turns from Direct CD to CD)."""

    shape: tuple[int, int, int]
    method: tuple[str, int | None]
    worlds: list[tuple] = field(default_factory=list)
    budgets: set[int] = field(default_factory=set)
    switches: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple:
        return (self.shape, self.method)

    @property
    def train_steps(self) -> int:
        return max(self.budgets)

    def eval_steps(self, convergence: bool) -> list[int]:
        halves = {b // 2 for b in self.budgets if b >= 2} if convergence else set()
        return sorted(self.budgets | halves | self.switches)


@dataclass
class MapPlan:
    cells: list[Cell]
    trainings: dict[tuple, Training]
    worlds: list[tuple]
    schedule: Any
    grid: Tensor


def plan_map(cfg) -> MapPlan:
    """Resolve every cell and group the cells into trainings (see the module docstring)."""
    schedule = make_world_schedule(cfg.world.schedule, cfg.world.timestep_offset)
    grid = make_grid(cfg.world.grid, schedule, cfg.world.grid_size)
    N = grid.numel() - 1
    base = {"score_error": cfg.teacher.knob if cfg.teacher.kind != "exact" else None,
            "dim": cfg.data.dim, "n_modes": cfg.data.n_modes, "width": cfg.network.width,
            "depth": cfg.network.depth, "k": cfg.k, "train_steps": cfg.train.train_steps, "direct_first": 0}
    if cfg.data.preset == "random" and base["n_modes"] is None:
        base["n_modes"] = 8
    cells, trainings, worlds = [], {}, []
    for i, rv in enumerate(cfg.rows.values):
        for j, cv in enumerate(cfg.cols.values):
            p = {**base, cfg.rows.name: rv, cfg.cols.name: cv}
            knob = None if p["score_error"] is None else float(p["score_error"])
            n_modes = p["n_modes"] if cfg.data.preset == "random" else None
            cell = Cell(i, j, {cfg.rows.name: rv, cfg.cols.name: cv}, knob, int(p["dim"]), n_modes, int(p["width"]),
                        int(p["depth"]), p["k"], int(p["train_steps"]), method_of(p["k"], N), base_of(p["direct_first"]))
            cells.append(cell)
            if cell.world not in worlds:
                worlds.append(cell.world)
            for method in dict.fromkeys([cell.base, cell.method]):  # CD first; a k = 1 cell needs CD only
                tr = trainings.setdefault((cell.shape, method), Training(cell.shape, method))
                if cell.world not in tr.worlds:
                    tr.worlds.append(cell.world)
                tr.budgets.add(cell.budget)
                if cell.base != CD:  # E at the switch, on the two-phase student and on Direct CD
                    tr.switches.add(cell.base[1])
    return MapPlan(cells, trainings, worlds, schedule, grid)


def w2(x: Tensor, ref: Tensor, max_points: int, seed: int) -> float:
    """Exact W2 (POT) between seeded subsamples of at most ``max_points`` of each set (the same indices
    for every student of a seed, so paired students are scored on the same reference points)."""
    g = torch.Generator().manual_seed(int(seed))
    xs = x[torch.randperm(x.shape[0], generator=g)[:max_points]] if x.shape[0] > max_points else x
    ys = ref[torch.randperm(ref.shape[0], generator=g)[:max_points]] if ref.shape[0] > max_points else ref
    return wasserstein2(xs, ys)


@dataclass
class SeedEval:
    """One (world, seed): evaluation noise ``x_T``, the teacher solver's chain from it (eq. 6's target),
    a p_0 reference and the teacher's samples (both from the seed's ``reference`` stream)."""

    x_T: Tensor
    chain: Tensor
    reference: Tensor
    teacher_samples: Tensor


class Worlds:
    """Builds (once) the mixtures, teachers, evaluation data and pools of the map's worlds."""

    def __init__(self, cfg, plan: MapPlan):
        self.cfg, self.plan = cfg, plan
        self.schedule, self.grid = plan.schedule, plan.grid
        self.t_T, self.t_0 = float(plan.grid[-1]), float(plan.grid[0])
        self._gmm: dict[tuple, Any] = {}
        self._teacher: dict[tuple, Any] = {}
        self._score_error: dict[tuple, float] = {}
        self._eval: dict[tuple, SeedEval] = {}
        self._pool: dict[tuple, TargetPool] = {}
        self.pool_seconds = 0.0

    def gmm(self, world: tuple):
        _, dim, n_modes = world
        if (dim, n_modes) not in self._gmm:
            upd = {"dim": dim, **({"n_modes": n_modes} if n_modes is not None else {})}
            self._gmm[(dim, n_modes)] = self.cfg.data.model_copy(update=upd).build()
        return self._gmm[(dim, n_modes)]

    def teacher_seed(self, seed: int) -> int | None:
        """A learned teacher's training seed (the run seed's ``teacher`` source); None for analytic teachers."""
        return self.cfg.seeding.seed_for("teacher", seed) if self.cfg.teacher.kind == "learned" else None

    def teacher(self, world: tuple, seed: int):
        t = self.cfg.teacher
        key = (world, self.teacher_seed(seed))
        if key not in self._teacher:
            knob = world[0]
            opts: dict[str, Any] = {}
            if t.kind in ("wrong_gmm", "nonconservative"):
                opts = {"delta": knob, **({"seed": t.seed} if t.kind == "wrong_gmm" else {})}
            elif t.kind == "learned":
                opts = {"budget": int(knob), "seed": key[1], "width": t.width, "depth": t.depth}
            den = make_teacher(t.kind, self.gmm(world), self.schedule, **opts)
            self._teacher[key] = den
            se = float(score_error(den, self.gmm(world), self.schedule, n=self.cfg.eval.score_error_samples,
                                   generator=torch.Generator().manual_seed(self.cfg.eval.seed + 3)).mean)
            self._score_error[key] = se if se > EXACT_TOL else 0.0  # below: float rounding of an exact teacher
        return self._teacher[key]

    def score_errors(self, world: tuple) -> list[float]:
        """The teacher's measured score error (eps MSE per coordinate) per seed's teacher."""
        return [self._score_error[(world, self.teacher_seed(s))] for s in self.cfg.seeds
                if (world, self.teacher_seed(s)) in self._score_error]

    def sample_data(self, world: tuple):
        gmm = self.gmm(world)
        return lambda n, g: gmm.sample_p0(n, g)[0]

    def seed_eval(self, world: tuple, seed: int) -> SeedEval:
        src, ev = self.cfg.seeding, self.cfg.eval
        key = (world, self.teacher_seed(seed), src.seed_for("eval_noise", seed), src.seed_for("reference", seed))
        if key not in self._eval:
            gmm, den = self.gmm(world), self.teacher(world, seed)
            x_T = gmm.sample_pt(ev.num_samples, self.t_T, self.schedule, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(key[2]))[0]
            with torch.no_grad():
                chain = solve(self.cfg.world.solver, den, x_T.float(), self.grid, self.grid.numel() - 1).x.double()
            g_ref = torch.Generator().manual_seed(key[3])
            reference = gmm.sample_p0(ev.num_samples, g_ref, dtype=torch.float64)[0]
            self._eval[key] = SeedEval(x_T, chain, reference, self._teacher_samples(world, seed, g_ref))
        return self._eval[key]

    def _teacher_samples(self, world: tuple, seed: int, g: torch.Generator) -> Tensor:
        """The teacher's exact-ODE samples from independent noise. A teacher that is an exact mixture
        denoiser (exact, wrong_gmm) pushes its own p_T exactly onto its mixture, so its samples are drawn
        from that mixture directly; other teachers are integrated (dopri5, float64) from ``x ~ p_T``."""
        from .score_error_world import teacher_ode

        den, n = self.teacher(world, seed), self.cfg.eval.num_samples
        if isinstance(den, ExactGMMDenoiser):
            return den.gmm.sample_p0(n, g, dtype=torch.float64)[0]
        x = self.gmm(world).sample_pt(n, self.t_T, self.schedule, generator=g, dtype=torch.float64)[0]
        return teacher_ode(den, x, self.t_T, self.t_0, self.cfg.eval)

    def pool(self, world: tuple, seed: int) -> TargetPool:
        ps = self.cfg.seeding.seed_for("pool", seed)
        key = (world, self.teacher_seed(seed), ps)
        if key not in self._pool:
            pool = TargetPool.build(self.teacher(world, seed), self.cfg.world.solver, self.grid, self.schedule,
                                    self.sample_data(world), self.cfg.train.pool_size, ps)
            self.pool_seconds += pool.build_seconds
            self._pool[key] = pool
        return self._pool[key]


@dataclass
class MapResults:
    """``values[training key][step][member] = {metric: value}``; ``members[training key]`` lists the
    (world, seed) of each member; ``final_loss`` per member; timings."""

    worlds: Worlds
    values: dict[tuple, dict[int, list[dict]]] = field(default_factory=dict)
    members: dict[tuple, list[tuple]] = field(default_factory=dict)
    final_loss: dict[tuple, list[float]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def at(self, key: tuple, step: int, world: tuple, seeds: list[int], metric: str) -> list[float]:
        idx = {m: i for i, m in enumerate(self.members[key])}
        return [self.values[key][step][idx[(world, s)]][metric] for s in seeds]


def method_name(method: tuple) -> str:
    if method[0] == "direct_first":
        return f"direct_first(P={method[1]})->cd"
    return method[0] if method[1] is None else f"cd_k(k={method[1]})"


def train_update(method: tuple) -> dict[str, Any]:
    """The ``TrainConfig`` fields that make a training of ``method``."""
    name, k = method
    if name == "direct_first":
        return {"method": "cd", "k": None, "direct_first_steps": k}
    return {"method": name, "k": k}


def run_trainings(cfg, plan: MapPlan, progress: bool = False) -> MapResults:
    """Train every ensemble of the plan and evaluate it along training (see the module docstring)."""
    W = Worlds(cfg, plan)
    res = MapResults(W)
    ev = cfg.eval
    with_start = time.perf_counter()
    for tr in plan.trainings.values():  # evaluation data and pools first (shared by every training)
        for world in tr.worlds:
            for s in cfg.seeds:
                W.seed_eval(world, s)
                W.pool(world, s)
    res.timing["worlds_and_pools"] = time.perf_counter() - with_start
    log(STUDY, f"{len(plan.worlds)} worlds x {len(cfg.seeds)} seeds: evaluation data and pools "
               f"{res.timing['worlds_and_pools']:.0f} s (pools {W.pool_seconds:.0f} s)")
    src = cfg.seeding
    for key, tr in plan.trainings.items():
        members = [(world, s) for world in tr.worlds for s in cfg.seeds]
        width, depth, dim = tr.shape
        net = cfg.network.model_copy(update={"width": width, "depth": depth, "dim": dim})
        student = make_ensemble_student(net, W.schedule, [src.seed_for("init", s) for _, s in members],
                                        boundary=cfg.world.boundary, t_min=W.t_0)
        routes = [Route(W.teacher(w, s), cfg.world.solver, W.pool(w, s), label=world_label(w, cfg.teacher.kind))
                  for w, s in members]
        evals = [W.seed_eval(w, s) for w, s in members]
        xs = torch.stack([e.x_T for e in evals]).float()
        tcfg = cfg.train.model_copy(update={**train_update(tr.method), "train_steps": tr.train_steps})
        steps: dict[int, list[dict]] = {}

        def on_eval(step, student, ema, _evals=evals, _steps=steps, _budgets=tr.budgets):
            out = student.one_step(xs, W.t_T).double()
            rows = []
            for m, e in enumerate(_evals):
                row = {"E_solver": float(per_sample_sq_error(out[m], e.chain).mean())}
                if step in _budgets:
                    row["w2_teacher"] = w2(out[m], e.teacher_samples, ev.max_points, ev.seed)
                    row["w2_p0"] = w2(out[m], e.reference, ev.max_points, ev.seed)
                rows.append(row)
            _steps[step] = rows

        name = f"{method_name(tr.method)} width={width} depth={depth} d={dim}"
        t0, c0 = time.perf_counter(), time.process_time()
        hist = train_ensemble(tcfg, student, routes, W.grid, W.sample_data(tr.worlds[0]),
                              progress=f"{name} (E={len(members)})" if progress else False,
                              batch_seeds=[src.seed_for("batch", s) for _, s in members],
                              eval_steps=tr.eval_steps(ev.convergence_check), on_eval=on_eval)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        res.values[key], res.members[key], res.final_loss[key] = steps, members, hist.final_loss()
        res.timing[f"train {name}"] = sec
        res.timing[f"train {name} (cpu)"] = cpu
        log(STUDY, f"{name}: {len(members)} members x {tr.train_steps} steps, {sec:.0f} s wall, {cpu:.0f} s cpu "
                   f"(load {os.getloadavg()[0]:.1f})")
    return res


def world_floors(cfg, plan: MapPlan, worlds: Worlds | None = None) -> dict[str, dict]:
    """Per world: the W2 floor to p_0 (two independent p_0 samples) and to the teacher's samples (two
    samples of the teacher's mixture; a teacher without one gets the p_0 floor, marked approximate),
    each a distribution over ``eval.floor_draws`` draws (``studies.evidence.floor_block``)."""
    W = worlds or Worlds(cfg, plan)
    ev, n = cfg.eval, cfg.eval.num_samples
    out: dict[str, dict] = {}

    def floor_of(mixture):
        def draw(s):
            a = mixture.sample_p0(n, torch.Generator().manual_seed(s + 1), dtype=torch.float64)[0]
            b = mixture.sample_p0(n, torch.Generator().manual_seed(s + 2), dtype=torch.float64)[0]
            return {"w2": w2(a, b, ev.max_points, s)}
        return evidence.floor_block(draw, ev.floor_draws, seed=ev.seed)["w2"]

    cache: dict[int, dict] = {}
    for world in plan.worlds:
        gmm = W.gmm(world)
        if id(gmm) not in cache:
            cache[id(gmm)] = floor_of(gmm)
        den = W.teacher(world, cfg.seeds[0])
        exact_mixture = isinstance(den, ExactGMMDenoiser)
        if cfg.teacher.kind == "exact":
            teacher_floor = cache[id(gmm)]
        else:
            teacher_floor = floor_of(den.gmm) if exact_mixture else cache[id(gmm)]
        out[world_label(world, cfg.teacher.kind)] = {"w2_p0": cache[id(gmm)], "w2_teacher": teacher_floor,
                                                     "teacher_floor_approximate": not exact_mixture}
    return out
