"""Solver ablation: the teacher's solver (DDIM, Euler, Heun) and grid size N, for CD and Direct CD.

``python -m studies.solver_ablation [--quick] [--set key=value ...]``

Exact GMM teacher, identity decoder. For each N in ``grid_sizes`` one grid (``world.grid``), and for
each method one batched ensemble whose members are ``solvers x seeds`` (each member routed to its own
solver's ``TargetPool``; the same seeds across solvers, so comparisons between solvers are paired).

Per (solver, N, method), mean ± std over seeds:

* ``E`` — against the member's own teacher solver, ``f_solver(x_T, t_N, t_0)`` (paper eq. 6);
* ``E_exact`` — against the exact PF-ODE endpoint (dopri5, float64);
* sample quality (W2, MMD^2, mode coverage, ...) of the one-step samples against ``p_0``;
* and, per (solver, N), the teacher solver's own distance to the exact ODE and its sample quality.

If Direct CD wins on ``E`` but not on ``E_exact`` or quality, its better ODE solving is only better
solving of the *discretised* teacher, the toy analogue of fitting an imperfect target.

Note: in exact arithmetic the DDIM and Euler steps are the same update in ``(x / alpha, sigma / alpha)``
coordinates (``odecm.solvers``); the two rows differ only by float rounding.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from odecm.cli import run_main
from odecm.config import SolverName, StrictModel
from toys.ensemble import Route, TargetPool, TrainConfig
from toys.networks import NetworkConfig

from . import cells
from .cells import DataConfig, EvalConfig, WorldConfig

STUDY = "solver_ablation"
METHODS = ("cd", "direct_cd")


class SolverAblationConfig(StrictModel):
    renamed_keys = {"num_steps": "grid_sizes"}

    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig(grid="uniform")  # skip grids need N | 1000; N = 18 does not
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, pool_size=2**16, log_every=100)
    eval: EvalConfig = EvalConfig()
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    solvers: list[SolverName] = Field(default_factory=lambda: ["ddim", "euler", "heun"])
    grid_sizes: list[int] = Field(default_factory=lambda: [10, 18, 50, 100], description="the N of each grid")
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    threads: int | None = Field(1, ge=1)
    progress: bool = False


QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256},
    "grid_sizes": [4, 10],
}


def run(cfg: SolverAblationConfig) -> dict:
    regimes, teacher, timing = [], {}, {}
    seeds = list(cfg.seeds)
    S = len(seeds)
    net = cfg.network.model_copy(update={"dim": cfg.data.dim})
    exact_cache = None
    for N in cfg.grid_sizes:
        t0 = time.perf_counter()
        worlds = {s: cells.build_world(cfg.data, cfg.world, solver=s, grid_size=N) for s in cfg.solvers}
        first = worlds[cfg.solvers[0]]
        ev_cfg = cfg.eval if exact_cache is None else cfg.eval.model_copy(update={"exact_ode": False})
        evs = {}
        for s, w in worlds.items():
            evs[s] = cells.make_eval_set(w, ev_cfg if s == cfg.solvers[0] else
                                         ev_cfg.model_copy(update={"exact_ode": False}), floor=False)
        # the exact endpoint depends on x_T and t_0 only: compute once, reuse for every solver and N
        if exact_cache is None or exact_cache[0] != float(first.grid[0]) or exact_cache[1] != float(first.grid[-1]):
            ev0 = evs[cfg.solvers[0]]
            if ev0.exact_end is None and cfg.eval.exact_ode:
                ev0.exact_end = first.gmm.exact_ode_solution(ev0.x_T, first.t_max, float(first.grid[0]),
                                                             first.schedule, rtol=1e-7, atol=1e-9)
            exact_cache = (float(first.grid[0]), float(first.grid[-1]), ev0.exact_end)
        for ev in evs.values():
            ev.exact_end = exact_cache[2]
        pools = {s: TargetPool.build(w.teacher, s, w.grid, w.schedule, w.sample_data, cfg.train.pool_size,
                                     cfg.train.pool_seed) for s, w in worlds.items()}
        timing[f"N={N} worlds+pools"] = time.perf_counter() - t0
        for s in cfg.solvers:
            teacher[f"{s} N={N}"] = cells.teacher_metrics(worlds[s], evs[s], cfg.eval)
        routes = [Route(worlds[s].teacher, s, pools[s]) for s in cfg.solvers for _ in seeds]
        member_seeds = [sd for _ in cfg.solvers for sd in seeds]
        per: dict[str, dict[str, dict[str, list[float]]]] = {s: {} for s in cfg.solvers}
        for method in METHODS:
            t1 = time.perf_counter()
            student, sec, loss = cells.train_cell(first, method, net, cfg.train, member_seeds, routes=routes,
                                                  init_steps=cfg.init_steps,
                                                  progress=cfg.progress and f"{method} N={N}")
            out = cells.one_step_outputs(student, first, evs[cfg.solvers[0]])
            for i, s in enumerate(cfg.solvers):
                rows = [cells.member_metrics(out[i * S + k], worlds[s], evs[s], cfg.eval) for k in range(S)]
                for k, r in enumerate(rows):
                    r["final_loss"] = loss[i * S + k]
                per[s][method] = cells.collect(rows)
            timing[f"N={N} {method}"] = time.perf_counter() - t1
            cells.log(STUDY, f"N={N} {method}: {timing[f'N={N} {method}']:.0f} s")
        for s in cfg.solvers:
            regimes.append(cells.regime_entry(f"{s} N={N}", "solver", {"solver": s, "N": N}, per[s],
                                              switches={"score_error": 0.0, "decoder": "identity"}))
    return {
        "quality": {"key": "w2", "label": "W2 of one-step samples to data (lower = better)"},
        "metric_keys": ["E", "E_exact", *cells.QUALITY_KEYS],
        "alt_quality_keys": ["sliced_w2", "mmd2", "mode_tv"],
        "regimes": regimes,
        "teacher": teacher,
        "timing": timing,
        "summary": summarize(regimes),
    }


def summarize(regimes: list[dict]) -> str:
    from .report import regime_verdicts

    comps = regime_verdicts({"quality": {"key": "w2"}, "regimes": regimes})
    comps_x = regime_verdicts({"quality": {"key": "w2"}, "regimes": regimes}, e_key="E_exact")
    para = [c.label for c in comps if c.paradox]
    closer = [c.label for c in comps_x if c.dE < 0]
    return (f"{len(para)}/{len(comps)} solver settings show the paradox (CD lower W2, Direct CD lower E)"
            + (f": {', '.join(para)}" if para else "")
            + f"; CD is closer to the exact ODE than Direct CD in {len(closer)}/{len(comps_x)}.")


def plot(metrics: dict, path) -> None:
    from . import common

    regs = metrics["regimes"]
    solvers = list(dict.fromkeys(r["params"]["solver"] for r in regs))
    keys = [("E", "E vs teacher solver"), ("E_exact", "E vs exact ODE"), ("w2", "W2 to data")]
    fig, axes = common.new_figure(1, 3, size=(3.6, 3.2))
    for j, (key, title) in enumerate(keys):
        ax = axes[0, j]
        for i, s in enumerate(solvers):
            rs = sorted([r for r in regs if r["params"]["solver"] == s], key=lambda r: r["params"]["N"])
            Ns = [r["params"]["N"] for r in rs]
            for m, ls in (("cd", "--"), ("direct_cd", "-")):
                if key not in rs[0]["methods"][m]:
                    continue
                ax.errorbar(Ns, [r["methods"][m][key]["mean"] for r in rs], yerr=[r["methods"][m][key]["std"] for r in rs],
                            ls=ls, marker="o", ms=3, capsize=2, color=f"C{i}",
                            label=f"{s} {'CD' if m == 'cd' else 'Direct CD'}")
        ax.set_yscale("log")
        ax.set_xscale("log")
        cells.tidy_log_axes(ax)
        Ns_all = sorted({r["params"]["N"] for r in regs})
        ax.set_xticks(Ns_all, [str(n) for n in Ns_all])
        ax.set_xlabel("N")
        ax.set_title(title, fontsize=9)
        if j == 0:
            ax.legend(fontsize=6)
    fig.suptitle("Solver ablation (exact teacher); dashed CD, solid Direct CD; mean ± std over seeds "
                 "(Euler coincides with DDIM)", fontsize=9)
    common.save_figure(fig, path)


def table(metrics: dict) -> str:
    from .common import fmt

    keys = ["E", "E_exact", "w2", "mmd2", "modes_covered", "final_loss"]
    lines = [f"# {STUDY}", "", metrics["summary"], "", cells.markdown_table(metrics["regimes"], keys, []), "",
             "Teacher solver alone (its samples against the data; its endpoint against the exact ODE):", "",
             "| solver N | E_solver_vs_exact | w2 | mmd2 | modes_covered |", "|---|---|---|---|---|"]
    for k, v in metrics["teacher"].items():
        lines.append(f"| {k} | {fmt(v.get('E_solver_vs_exact'))} | {fmt(v.get('w2'))} | {fmt(v.get('mmd2'))} | "
                     f"{fmt(v.get('modes_covered'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, SolverAblationConfig, QUICK, run, table, plot, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
