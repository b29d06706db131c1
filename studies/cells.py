"""Shared pieces of the exact-teacher toy studies (latent_space, inductive_bias, solver_ablation).

A **world** is data + exact teacher + solver + grid: the mixture ``p_0`` (``toys.gmm.make_preset``), a
schedule (SDXL's, with the paper's indexing ``timestep_offset=1`` by default, so the grid ends at
clean data), the exact GMM denoiser as teacher, the teacher's one-step solver ``Phi`` and the grid
``t_0 < ... < t_N``. A **cell** trains CD and Direct CD students in one world as batched ensembles
(``toys.ensemble``: one member per seed, or solvers x seeds) and evaluates every member.

Seeds (``studies.seeding``): run seed s gives member s its own initialisation, batch stream, Direct CD
target pool, evaluation noise and reference sample (any of them can be held fixed with
``seeding.hold_fixed``). CD and Direct CD students of seed s share all of them, so their metrics are
paired per seed. Per member, from its evaluation noise ``x_T ~ p_T`` (``T = t_N``):

* ``E = mean_i |f_theta(x_T,i) - f_solver(x_T,i, t_N, t_0)|^2`` (paper eq. 6) against the teacher solver;
* ``E_exact``: the same against the exact PF-ODE endpoint (adaptive dopri5 in float64);
* sample quality of the one-step samples against its reference sample of ``p_0`` (``toys.metrics``;
  the exact teacher's samples are distributed as ``p_0``, so this is also the distance to the teacher's
  samples), with ``variance_ratio`` (shrinkage) and per-sample terms for bootstrap intervals;
* the finite-sample floor of every metric as a distribution over ``eval.floor_draws`` (>= 10) draws.

Every number is reproducible from the saved config. The configs, ``World`` and the evaluation sets live in
``studies.cells_world``; the tables and the entry point in ``studies.cells_report`` (both re-exported here).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from odecm.metrics import per_sample_sq_error
from toys.ensemble import (EnsembleStudent, Route, TargetPool, TrainConfig, init_from_teacher, make_ensemble_student,
                           train_ensemble)
from toys.metrics import covariance_spectrum, finite_sample_floor, per_sample_quality, sample_quality
from toys.networks import NetworkConfig

from . import common, evidence
from .cells_report import (budget_line, floor_line, markdown_table, merged_note, run_study, verdict_table,
                           write_outputs)
from .cells_world import (DataConfig, EvalCache, EvalConfig, EvalSet, World, WorldConfig, build_world, check_grid,
                          grid_problem, make_eval_set, make_world_schedule)
from .seeding import SeedConfig

Tensor = torch.Tensor

__all__ = [
    "DataConfig", "WorldConfig", "EvalConfig", "World", "build_world", "make_world_schedule", "grid_problem",
    "check_grid", "EvalSet",
    "make_eval_set", "EvalCache", "build_pools", "train_cell", "evaluate_members", "errors_only", "member_metrics",
    "collect", "teacher_metrics", "world_floor", "markdown_table", "run_study", "write_outputs", "QUALITY_KEYS",
    "PER_SAMPLE_KEYS", "CURVE_KEYS", "log", "CellResult", "cell_methods", "run_cell", "spectra", "one_step_outputs",
    # from studies.cells_report
    "budget_line", "merged_note", "floor_line", "verdict_table",
]

#: the sample-quality numbers kept per member (lower is better except precision/recall/modes_covered)
QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "modes_covered", "mode_precision", "mode_tv",
                "nll", "variance_ratio")
#: per-sample terms bootstrapped over evaluation samples
PER_SAMPLE_KEYS = ("E", "E_exact", "nll", "precision", "mode_precision")
#: the metrics ``curves.keys`` may keep along training (``run_cell``)
CURVE_KEYS = ("E", "E_exact", *QUALITY_KEYS)


def world_floor(world: World, cfg: EvalConfig) -> dict[str, dict]:
    """The floor of every quality key between two independent p_0 samples of the evaluation size, as a
    distribution over ``cfg.floor_draws`` draws (``studies.evidence.floor_block``)."""
    def draw(s: int) -> dict[str, float]:
        q = finite_sample_floor(world.gmm, cfg.num_samples, seed=s, max_points=cfg.max_points, shrinkage=True)
        return {k: float(q[k]) for k in QUALITY_KEYS if k in q}
    return evidence.floor_block(draw, cfg.floor_draws, seed=cfg.seed)


def log(study: str, msg: str) -> None:
    """One progress line on stdout (the studies run in the background with logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {study}: {msg}", flush=True)


def build_pools(world: World, train: TrainConfig, seeding: SeedConfig, seeds: Sequence[int],
                solver: str | None = None) -> dict[int, TargetPool]:
    """One Direct CD target pool per run seed (``pool`` source; pools of held seeds are built once)."""
    solver = solver or world.solver
    built: dict[int, TargetPool] = {}
    out = {}
    for s in seeds:
        ps = seeding.seed_for("pool", s)
        if ps not in built:
            built[ps] = TargetPool.build(world.teacher, solver, world.grid, world.schedule, world.sample_data,
                                         train.pool_size, ps)
        out[s] = built[ps]
    return out


def train_cell(world: World, method: str, network: NetworkConfig, train: TrainConfig, seeds: Sequence[int],
               seeding: SeedConfig, routes: Sequence[Route], progress: bool | str = False, init_steps: int = 0,
               eval_steps: Sequence[int] = (), on_eval: Callable | None = None,
               ema_rate: float | None = None) -> tuple[EnsembleStudent, float, list[float]]:
    """Train one ensemble (member m = run seed ``seeds[m]`` on ``routes[m]``) with ``method``; returns
    (student, seconds, final losses). ``method="cd_ema"`` is CD with the EMA target of rate ``ema_rate``.
    ``init_steps > 0`` first regresses each member's denoiser on its teacher
    (``toys.ensemble.init_from_teacher``: the toy analogue of a student starting from the teacher)."""
    init_seeds = [seeding.seed_for("init", s) for s in seeds]
    batch_seeds = [seeding.seed_for("batch", s) for s in seeds]
    student = make_ensemble_student(network, world.schedule, init_seeds, boundary=world.boundary, t_min=world.t_0)
    update: dict[str, Any] = {"method": "cd" if method == "cd_ema" else method}
    if method == "cd_ema":
        update["ema_rate"] = float(ema_rate or 0.99)
    tcfg = train.model_copy(update=update)
    if tcfg.data != "pool":
        routes = [Route(r.teacher, r.solver, None, r.label) for r in routes]
    start = time.perf_counter()
    if init_steps:
        init_from_teacher(student, routes, world.grid, world.sample_data, init_steps, tcfg.batch_size, tcfg.lr,
                          batch_seeds=batch_seeds)
    hist = train_ensemble(tcfg, student, routes, world.grid, world.sample_data, progress=progress,
                          batch_seeds=batch_seeds, eval_steps=eval_steps, on_eval=on_eval)
    return student, time.perf_counter() - start, hist.final_loss()


def one_step_outputs(student: EnsembleStudent, t_max: float, evs: Sequence[EvalSet]) -> Tensor:
    """Member m's one-step samples from its own evaluation noise ``evs[m].x_T``: ``(E, M, d)`` float64."""
    return student.one_step(torch.stack([ev.x_T for ev in evs]).float(), t_max).double()


def errors_only(student: EnsembleStudent, t_max: float, evs: Sequence[EvalSet]) -> list[float]:
    """Per-member ``E`` (against each member's solver endpoint): the cheap check of convergence."""
    out = one_step_outputs(student, t_max, evs)
    return [float(per_sample_sq_error(out[m], ev.solver_end).mean()) for m, ev in enumerate(evs)]


def member_metrics(x: Tensor, world: World, ev: EvalSet, cfg: EvalConfig,
                   per_sample: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``E``, ``E_exact`` and the quality keys of one member, and its per-sample terms."""
    e_i = per_sample_sq_error(x, ev.solver_end)
    vals = {"E": float(e_i.mean())}
    terms: dict[str, np.ndarray] = {"E": e_i.numpy()}
    if ev.exact_end is not None:
        ex_i = per_sample_sq_error(x, ev.exact_end)
        vals["E_exact"], terms["E_exact"] = float(ex_i.mean()), ex_i.numpy()
    q = sample_quality(x, ev.reference, gmm=world.gmm, seed=cfg.seed, max_points=cfg.max_points, shrinkage=True)
    vals.update({k: float(q[k]) for k in QUALITY_KEYS if k in q})
    if per_sample:
        ps = per_sample_quality(x, ev.reference, gmm=world.gmm)
        terms.update({"nll": ps["nll"].numpy(), "precision": ps["precision"].numpy(),
                      "mode_precision": ps["mode_good"].numpy()})
    return vals, terms


def collect(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """List of per-member dicts -> dict of per-member lists."""
    out: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            out.setdefault(k, []).append(v)
    return out


def evaluate_members(student: EnsembleStudent, worlds: Sequence[World], evs: Sequence[EvalSet], cfg: EvalConfig,
                     per_sample: bool = True) -> tuple[dict[str, list[float]], dict[str, list[np.ndarray]], Tensor]:
    """Per-member metrics and per-sample terms (member m in ``worlds[m]`` with ``evs[m]``); also the outputs."""
    out = one_step_outputs(student, worlds[0].t_max, evs)
    rows = [member_metrics(out[m], worlds[m], evs[m], cfg, per_sample) for m in range(out.shape[0])]
    return collect([r[0] for r in rows]), collect([r[1] for r in rows]), out


def spectra(outputs: Tensor, evs: Sequence[EvalSet]) -> dict[str, list[float]]:
    """Mean over members of the sample covariance spectrum, the reference's and their rank-wise ratio."""
    s = torch.stack([covariance_spectrum(outputs[m]) for m in range(outputs.shape[0])]).mean(0)
    r = torch.stack([covariance_spectrum(ev.reference) for ev in evs]).mean(0)
    return {"student": s.tolist(), "reference": r.tolist(), "ratio": (s / r.clamp(min=1e-300)).tolist()}


def teacher_metrics(world: World, evs: Sequence[EvalSet], cfg: EvalConfig) -> dict[str, dict]:
    """The teacher solver's own samples per seed: quality and distance to the exact ODE endpoint."""
    rows = []
    for ev in evs:
        q = sample_quality(ev.solver_end, ev.reference, gmm=world.gmm, seed=cfg.seed, max_points=cfg.max_points,
                           shrinkage=True)
        row = {k: float(q[k]) for k in QUALITY_KEYS if k in q}
        if ev.exact_end is not None:
            row["E_solver_vs_exact"] = float(per_sample_sq_error(ev.solver_end, ev.exact_end).mean())
        rows.append(row)
    return {k: common.stat(v) for k, v in collect(rows).items()}


@dataclass
class CellResult:
    """What ``run_cell`` returns per method: per-member metrics and per-sample terms, the one-step
    outputs ``(E, M, d)``, convergence flags and training seconds; plus the curve recorder (curves on)."""

    metrics: dict[str, dict[str, list[float]]]
    per_sample: dict[str, dict[str, list[np.ndarray]]]
    outputs: dict[str, Tensor]
    converged: dict[str, list[bool]]
    seconds: dict[str, float]
    recorder: Any = None  # studies.curves.CurveRecorder when curves are on: .to_dict(members=slice)


def cell_methods(curves) -> list[str]:
    """CD and Direct CD, plus CD with an EMA target when curves ask for it."""
    return ["cd", "direct_cd"] + (["cd_ema"] if curves.enabled and "ema" in curves.targets else [])


def run_cell(study: str, label: str, params: Mapping[str, Any], worlds: Sequence[World], evs: Sequence[EvalSet],
             routes: Sequence[Route], seeds: Sequence[int], network: NetworkConfig, train: TrainConfig,
             cfg: EvalConfig, seeding: SeedConfig, curves, init_steps: int = 0, progress: bool = False,
             methods: Sequence[str] | None = None, curve_keys: Sequence[str] = ("E", "E_exact", "w2", "mmd2",
                                                                                 "variance_ratio")) -> CellResult:
    """Train and evaluate one cell for every method: member m is run seed ``seeds[m]`` in ``worlds[m]``
    on ``routes[m]``, evaluated on ``evs[m]``. Along training: E at half the budget (the convergence
    flag) or, with ``curves.enabled``, ``curve_keys`` at every curve step (``studies.curves``)."""
    from .curves import CurveRecorder

    methods = list(methods or cell_methods(curves))
    steps = train.train_steps
    if curves.enabled:
        eval_steps = list(curves.steps)
    else:
        eval_steps = [steps // 2] if (cfg.convergence_check and steps >= 2) else []
    recorder = CurveRecorder(label, params, eval_steps)
    keys = list(curves.keys or curve_keys) if curves.enabled else ["E"]

    def evaluate(student):
        if keys == ["E"]:
            return {"E": errors_only(student, worlds[0].t_max, evs)}
        vals, _, _ = evaluate_members(student, worlds, evs, cfg, per_sample=False)
        return {k: vals[k] for k in keys if k in vals}

    res = CellResult({}, {}, {}, {}, {})
    for method in methods:
        student, sec, loss = train_cell(worlds[0], method, network, train, seeds, seeding, routes,
                                        progress=progress and f"{label} {method}", init_steps=init_steps,
                                        eval_steps=eval_steps, on_eval=recorder.callback(method, evaluate),
                                        ema_rate=curves.ema_rate)
        vals, terms, out = evaluate_members(student, worlds, evs, cfg)
        vals["final_loss"] = loss
        res.metrics[method], res.per_sample[method], res.outputs[method] = vals, terms, out
        res.seconds[method] = sec
        if curves.enabled:  # the last curve step is the budget (studies.curves.check_curve_budget)
            flags = recorder.to_dict()["converged"].get(method) or []
            res.converged[method] = flags[-1] if flags and flags[-1] is not None else []
        elif eval_steps:
            res.converged[method] = evidence.converged_flags(vals["E"], recorder.points[method][eval_steps[0]]["E"])
        log(study, f"{label} {method}: train {sec:.0f} s, E {np.mean(vals['E']):.3g}, W2 {np.mean(vals['w2']):.3g}")
    res.recorder = recorder if curves.enabled else None
    return res

