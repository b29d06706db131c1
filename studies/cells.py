"""Shared pieces of the toy studies (latent_space, inductive_bias, solver_ablation).

A **world** is data + exact teacher + solver + grid: the mixture ``p_0`` (``toys.gmm.make_preset``),
a schedule, the exact GMM denoiser as teacher, the teacher's one-step solver ``Phi`` and the grid
``t_0 < ... < t_N``. A **cell** trains CD and Direct CD students in one world as batched ensembles
(``toys.ensemble``: one member per seed, Direct CD from a precomputed ``TargetPool`` whose training
pairs CD shares) and evaluates every member on one fixed evaluation set:

* ``x_T ~ p_T`` (the exact marginal at ``t_N``, drawn from ``eval.seed``);
* ``E = mean (f_theta(x_T, t_N) - f_solver(x_T, t_N, t_0))^2`` (paper eq. 6) against the teacher solver;
* ``E_exact`` = the same against the exact PF-ODE endpoint (adaptive dopri5 in float64);
* sample quality of the one-step samples ``f_theta(x_T, t_N)`` against an independent reference set
  from ``p_0`` (``toys.metrics.sample_quality``; lower W2 / MMD = better), and the finite-sample floor.

Every number is reproducible from the saved config: seeds fix the pool, the initialisation, the
per-member data streams and the evaluation set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field

from odecm.config import SolverName, StrictModel
from odecm.grids import make_grid
from odecm.metrics import per_sample_sq_error
from odecm.schedules import NoiseSchedule, make_schedule
from odecm.solvers import solve
from toys.ensemble import (EnsembleStudent, Route, TargetPool, TrainConfig, init_from_teacher, make_ensemble_student,
                           train_ensemble)
from toys.gmm import GaussianMixture, make_preset
from toys.metrics import finite_sample_floor, sample_quality
from toys.networks import NetworkConfig

from .common import fmt_stat, stat

Tensor = torch.Tensor

__all__ = [
    "DataConfig",
    "WorldConfig",
    "EvalConfig",
    "World",
    "build_world",
    "EvalSet",
    "make_eval_set",
    "train_cell",
    "evaluate_members",
    "one_step_outputs",
    "member_metrics",
    "collect",
    "teacher_metrics",
    "regime_entry",
    "markdown_table",
    "tidy_log_axes",
    "run_study",
    "QUALITY_KEYS",
]

#: the sample-quality numbers kept per member (lower is better except precision/recall/modes_covered)
QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "modes_covered", "mode_tv", "nll")


class DataConfig(StrictModel):
    """The data mixture: ``toys.gmm.make_preset(preset, dim, embed, **options)``."""

    preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso", "random"] = "ring8"
    dim: int = Field(2, ge=2)
    embed: Literal["pad", "rotate"] = "pad"
    n_modes: int | None = Field(None, ge=1, description="modes of the 'random' preset (default 8)")
    seed: int = 0

    def build(self) -> GaussianMixture:
        kw = {"n_modes": self.n_modes} if (self.preset == "random" and self.n_modes) else {}
        if self.n_modes and self.preset != "random":
            raise ValueError(f"data.n_modes applies to preset 'random' only (got preset={self.preset!r})")
        return make_preset(self.preset, self.dim, embed=self.embed, seed=self.seed, **kw)


class WorldConfig(StrictModel):
    """Teacher solver and time grid (the teacher itself is the exact GMM denoiser). Defaults follow
    the paper (and ``studies.score_error``): SDXL's discrete schedule, the LCM skip grid with N = 20,
    DDIM, LCM boundary scalings."""

    renamed_keys = {"num_steps": "grid_size"}

    schedule: Literal["vp", "vp_cosine", "ve", "edm", "sdxl"] = "sdxl"
    grid: Literal["uniform", "karras", "skip"] = "skip"
    solver: SolverName = "ddim"
    grid_size: int = Field(20, ge=1, description="N, the number of grid intervals")
    boundary: Literal["lcm", "edm"] = "lcm"


class EvalConfig(StrictModel):
    num_samples: int = Field(2000, ge=10, description="one-step samples per member")
    max_points: int = Field(1000, ge=10, description="subsample for the O(n^2) metrics (W2, MMD, k-NN)")
    exact_ode: bool = True
    seed: int = 777


@dataclass
class World:
    gmm: GaussianMixture
    schedule: NoiseSchedule
    grid: Tensor
    solver: str
    boundary: str
    teacher: Any

    @property
    def t_max(self) -> float:
        return float(self.grid[-1])

    def sample_data(self, n: int, g: torch.Generator) -> Tensor:
        return self.gmm.sample_p0(n, g)[0]


def build_world(data: DataConfig, world: WorldConfig, solver: str | None = None, grid_size: int | None = None) -> World:
    """The world of ``data`` and ``world`` (``solver`` / ``grid_size`` override the config's)."""
    gmm = data.build()
    schedule = make_schedule(world.schedule)
    grid = make_grid(world.grid, schedule, grid_size or world.grid_size)
    return World(gmm, schedule, grid, solver or world.solver, world.boundary, gmm.exact_denoiser(schedule))


@dataclass
class EvalSet:
    """Fixed evaluation data of one world: noise ``x_T``, the teacher solver's and the exact ODE's
    endpoints from it, a reference sample of ``p_0`` and the finite-sample floor of the metrics."""

    x_T: Tensor
    solver_end: Tensor
    exact_end: Tensor | None
    reference: Tensor
    floor: dict[str, float]
    seconds: float = 0.0


def make_eval_set(world: World, cfg: EvalConfig, floor: bool = True) -> EvalSet:
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    x_T, _ = world.gmm.sample_pt(cfg.num_samples, world.t_max, world.schedule, generator=g, dtype=torch.float64)
    N = world.grid.numel() - 1
    with torch.no_grad():
        solver_end = solve(world.solver, world.teacher, x_T, world.grid, N).x
    exact = None
    if cfg.exact_ode:
        exact = world.gmm.exact_ode_solution(x_T, world.t_max, float(world.grid[0]), world.schedule,
                                             rtol=1e-7, atol=1e-9)
    reference = world.gmm.sample_p0(cfg.num_samples, torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64)[0]
    fl = {}
    if floor:
        fl = finite_sample_floor(world.gmm, cfg.num_samples, seed=cfg.seed + 10, max_points=cfg.max_points)
    return EvalSet(x_T, solver_end, exact, reference, fl, time.perf_counter() - start)


def log(study: str, msg: str) -> None:
    """One progress line on stdout (the studies run in the background with logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {study}: {msg}", flush=True)


def train_cell(world: World, method: str, network: NetworkConfig, train: TrainConfig, seeds: Sequence[int],
               pool: TargetPool | None = None, routes: Sequence[Route] | None = None,
               progress: bool | str = False, init_steps: int = 0) -> tuple[EnsembleStudent, float, list[float]]:
    """Train one ensemble (members = seeds) with ``method``; returns (student, seconds, final losses).

    Every member learns from ``Route(world.teacher, world.solver, pool)`` unless ``routes`` gives
    one route per member (e.g. different solvers batched into one ensemble). ``init_steps > 0``
    first regresses each member's denoiser on its teacher (``toys.ensemble.init_from_teacher``: the
    toy analogue of the paper's student starting from the teacher's weights)."""
    student = make_ensemble_student(network, world.schedule, seeds, boundary=world.boundary,
                                    t_min=float(world.grid[0]))
    tcfg = train.model_copy(update={"method": method})
    if routes is None:
        routes = Route(world.teacher, world.solver, pool if tcfg.data == "pool" else None)
    start = time.perf_counter()
    if init_steps:
        init_from_teacher(student, routes, world.grid, world.sample_data, init_steps, tcfg.batch_size, tcfg.lr)
    hist = train_ensemble(tcfg, student, routes, world.grid, world.sample_data, progress=progress)
    return student, time.perf_counter() - start, hist.final_loss()


def one_step_outputs(student: EnsembleStudent, world: World, ev: EvalSet) -> Tensor:
    """Every member's one-step samples ``f_m(x_T, t_N)`` from the shared noise: ``(E, M, d)`` float64."""
    return student.one_step(ev.x_T.float(), world.t_max).double()


def member_metrics(x: Tensor, world: World, ev: EvalSet, cfg: EvalConfig,
                   solver_end: Tensor | None = None) -> dict[str, float]:
    """``E`` (against ``solver_end``, default the eval set's), ``E_exact`` and the quality keys of one member."""
    target = ev.solver_end if solver_end is None else solver_end
    vals = {"E": float(per_sample_sq_error(x, target).mean())}
    if ev.exact_end is not None:
        vals["E_exact"] = float(per_sample_sq_error(x, ev.exact_end).mean())
    q = sample_quality(x, ev.reference, gmm=world.gmm, seed=cfg.seed, max_points=cfg.max_points)
    vals.update({k: float(q[k]) for k in QUALITY_KEYS if k in q})
    return vals


def collect(rows: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """List of per-member dicts -> dict of per-member lists."""
    out: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            out.setdefault(k, []).append(v)
    return out


def evaluate_members(student: EnsembleStudent, world: World, ev: EvalSet,
                     cfg: EvalConfig) -> tuple[dict[str, list[float]], Tensor]:
    """Per-member ``E``, ``E_exact`` and the sample-quality keys; also returns the one-step outputs."""
    out = one_step_outputs(student, world, ev)
    return collect([member_metrics(out[m], world, ev, cfg) for m in range(out.shape[0])]), out


def teacher_metrics(world: World, ev: EvalSet, cfg: EvalConfig) -> dict[str, float]:
    """Quality of the teacher solver's own samples and its distance to the exact ODE endpoint."""
    q = sample_quality(ev.solver_end, ev.reference, gmm=world.gmm, seed=cfg.seed, max_points=cfg.max_points)
    out = {k: float(q[k]) for k in QUALITY_KEYS if k in q}
    if ev.exact_end is not None:
        out["E_solver_vs_exact"] = float(per_sample_sq_error(ev.solver_end, ev.exact_end).mean())
    return out


def regime_entry(label: str, group: str, params: dict, per_method: dict[str, dict[str, list[float]]],
                 switches: dict | None = None) -> dict:
    """One regime of the report schema: ``{"label", "group", "params", "switches", "methods": {m: {k: stat}}}``."""
    return {"label": label, "group": group, "params": params, "switches": switches or {},
            "methods": {m: {k: stat(v) for k, v in vals.items()} for m, vals in per_method.items()}}


def markdown_table(regimes: list[dict], keys: Sequence[str], param_keys: Sequence[str]) -> str:
    """Rows = (regime, method); columns = params then metric means ± std over seeds."""
    head = ["regime", *param_keys, "method", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in regimes:
        for m, vals in r["methods"].items():
            cells = [r["label"], *[str(r["params"].get(p, "")) for p in param_keys], m]
            cells += [fmt_stat(vals[k]) if k in vals else "-" for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tidy_log_axes(ax) -> None:
    """No minor tick labels on log axes (they overlap when a panel spans less than a decade)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())


# ------------------------------------------------------------------------------------------------
# entry point (CLI and results folder from studies.common)
# ------------------------------------------------------------------------------------------------
def run_study(study: str, model, quick: dict[str, Any], run: Callable, table: Callable, plot: Callable,
              argv: list[str] | None, description: str) -> Path:
    """Parse the common flags, resolve the config, run, write ``config.json``, ``metrics.json``,
    ``table.md`` and ``<study>.png`` into the results folder; return the folder."""
    from . import common

    args = common.parse_args(study, argv, description)
    cfg = common.resolve_config(model, args, quick)
    updates = {}
    if args.threads is not None:
        updates["threads"] = args.threads
    if not args.progress:
        updates["progress"] = False
    if updates:
        cfg = cfg.model_copy(update=updates)
    common.set_threads(cfg.threads)
    out = common.results_folder(study, args)
    common.save_config(out, cfg, argv=argv, study=study, quick=bool(args.quick))
    t0 = time.perf_counter()
    metrics = run(cfg)
    metrics.setdefault("timing", {})["total_seconds"] = time.perf_counter() - t0
    common.write_json(out / "metrics.json", {"study": study, **metrics})
    common.write_table(out, table(metrics), echo=False)
    plot(metrics, out / f"{study}.png")
    print(f"{study}: {metrics.get('summary', '')} -> {out} ({metrics['timing']['total_seconds']:.0f} s)")
    return out
