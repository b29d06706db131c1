"""Solver ablation: the teacher's solver and grid size N, for CD and Direct CD (exact teacher).

``python -m studies.solver_ablation [--quick] [--config FILE] [--set key=value ...] [--out DIR]``
``metrics = studies.solver_ablation.run(cfg)`` (Python; ``out_dir=None`` writes nothing)

Exact GMM teacher, identity decoder, SDXL's schedule with the paper's indexing and the paper's skip
grid for each N in ``grid_sizes`` (N | 1000). Solvers: ``ddim``, ``euler_vp`` and ``heun_vp`` (the
paper's Euler and Heun on the VP PF-ODE in (x, t)); the EDM forms ``euler`` / ``heun`` stay selectable
(EDM's Euler is DDIM in exact arithmetic: its rows are merged with DDIM's and named together). For
each N and method one batched ensemble with members = solvers x seeds (each member on its own
solver's and seed's ``TargetPool``; the same seeds across solvers, so solver comparisons are paired).

Per (solver, N, method), over seeds: ``E`` against the member's own teacher solver (paper eq. 6),
``E_exact`` against the exact PF-ODE endpoint, sample quality against p_0 (= the exact teacher's
samples), shrinkage (``variance_ratio``); per (solver, N) the teacher solver's own distance to the
exact ODE. Verdicts (``studies.stats.classify_regimes``) use W2 and E, and again E_exact: if Direct CD
wins on E but not on E_exact, its better ODE solving is only better solving of the *discretised* teacher.
"""
from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from odecm.cli import run_main
from odecm.config import SolverName
from toys.ensemble import Route, TrainConfig
from toys.networks import NetworkConfig

from . import cells, common, evidence, plotting
from .cells import DataConfig, EvalConfig, WorldConfig, check_grid
from .curves import CurveConfig, TrainedStudyConfig, check_curve_budget, plot_curves
from .seeding import SeedConfig

STUDY = "solver_ablation"
TABLE_KEYS = ("E", "E_exact", "w2", "mmd2", "modes_covered", "variance_ratio")


class SolverAblationConfig(TrainedStudyConfig):
    CURVE_KEYS = cells.CURVE_KEYS
    renamed_keys = {"num_steps": "grid_sizes"}

    quick: bool = Field(False, description="a smoke run (set by --quick): never evidence")
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, pool_size=2**16, log_every=100, lr=2e-3,
                                     lr_schedule="cosine")
    eval: EvalConfig = EvalConfig()
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    seeding: SeedConfig = SeedConfig()
    solvers: list[SolverName] = Field(default_factory=lambda: ["ddim", "euler_vp", "heun_vp"])
    grid_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [10, 20, 50, 100], validate_default=True,
        description="the N of each grid (>= 1, distinct; skip grid: N | 1000)")
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    curves: CurveConfig = CurveConfig()
    threads: int | None = Field(1, ge=1)
    progress: bool = False

    @field_validator("world")
    @classmethod
    def _world(cls, v: WorldConfig) -> WorldConfig:
        unused = {k: getattr(v, k) for k, default in (("grid_size", 20), ("solver", "ddim"))
                  if getattr(v, k) != default}
        if unused:
            shown = ", ".join(f"{k}={x!r}" for k, x in unused.items())
            raise PydanticCustomError("set_by_the_study", f"{shown}: the ablation sets them from grid_sizes and "
                                      "solvers; allowed: the defaults grid_size 20, solver 'ddim' (set grid_sizes / "
                                      "solvers)")
        return v

    @field_validator("seeds", "solvers")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return common.distinct(v)

    @field_validator("grid_sizes")
    @classmethod
    def _grid_sizes(cls, v: list[int], info: ValidationInfo) -> list[int]:
        common.distinct(v)
        world = info.data.get("world")
        if world is not None:
            for n in v:
                check_grid(world.grid, world.schedule, n, world.timestep_offset)
        return v

    @model_validator(mode="after")
    def _check(self):
        check_curve_budget(self.curves, self.train)
        return self


QUICK: dict[str, Any] = {
    "quick": True,
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256, "n_resamples": 200},
    "grid_sizes": [4, 10],
}


def run(cfg: SolverAblationConfig, out_dir=None, progress: bool | None = None, argv=None) -> dict:
    """Run the ablation; return the metrics dict (``studies.evidence`` schema). With ``out_dir`` the
    folder gets ``config.json``, ``metrics.json``, ``table.md`` and the figures (PNG + PDF)."""
    out = common.open_output(out_dir, cfg, argv, study=STUDY)
    common.set_threads(cfg.threads)
    progress = cfg.progress if progress is None else progress
    t_start = time.perf_counter()
    seeds, S = list(cfg.seeds), len(cfg.seeds)
    net = cfg.network.model_copy(update={"dim": cfg.data.dim})
    cache = cells.EvalCache()
    regimes, teacher, timing, curves, floor = [], {}, {}, [], None
    for N in cfg.grid_sizes:
        t0 = time.perf_counter()
        worlds = {s: cells.build_world(cfg.data, cfg.world, solver=s, grid_size=N) for s in cfg.solvers}
        if floor is None:
            floor = cells.world_floor(worlds[cfg.solvers[0]], cfg.eval)
        evs = {s: [cells.make_eval_set(w, cfg.eval, cfg.seeding.seed_for("eval_noise", sd),
                                       cfg.seeding.seed_for("reference", sd), cache) for sd in seeds]
               for s, w in worlds.items()}
        pools = {s: cells.build_pools(w, cfg.train, cfg.seeding, seeds) for s, w in worlds.items()}
        for s in cfg.solvers:
            teacher[f"{s} N={N}"] = cells.teacher_metrics(worlds[s], evs[s], cfg.eval)
        timing[f"N={N} worlds+pools"] = time.perf_counter() - t0
        members = [(s, k) for s in cfg.solvers for k in range(S)]
        routes = [Route(worlds[s].teacher, s, pools[s][seeds[k]], label=f"exact N={N}") for s, k in members]
        t1 = time.perf_counter()
        res = cells.run_cell(STUDY, f"N={N}", {"N": N}, [worlds[s] for s, _ in members],
                             [evs[s][k] for s, k in members], routes, [seeds[k] for _, k in members], net, cfg.train,
                             cfg.eval, cfg.seeding, cfg.curves, cfg.init_steps, progress)
        timing[f"N={N} train+eval"] = time.perf_counter() - t1
        for i, s in enumerate(cfg.solvers):
            sl = slice(i * S, (i + 1) * S)
            per = {m: {k: v[sl] for k, v in vals.items()} for m, vals in res.metrics.items()}
            conv = {m: flags[sl] for m, flags in res.converged.items()}
            r = evidence.regime_entry(f"{s} N={N}", "solver", {"solver": s, "N": N}, per,
                                      switches={"score_error": 0.0, "decoder": "identity"}, converged=conv)
            r["eval_intervals"] = evidence.eval_intervals(
                {m: {k: v[sl] for k, v in res.per_sample[m].items()} for m in evidence.METHODS},
                cfg.eval.n_resamples, seed=cfg.eval.seed)
            r["spectra"] = {m: cells.spectra(res.outputs[m][sl], evs[s]) for m in res.outputs}
            regimes.append(evidence.add_differences(r))
            if res.recorder is not None:
                curves.append(res.recorder.to_dict(sl, label=f"{s} N={N}", params={"solver": s, "N": N}))
    kept, merged = evidence.merge_regimes(regimes, "solver", ("N",))
    v = evidence.verdicts(kept, "w2", quick=cfg.quick)
    v_exact = evidence.verdicts(kept, "w2", e_key="E_exact", quick=cfg.quick)
    timing["total_seconds"] = time.perf_counter() - t_start
    metrics = {
        "study": STUDY, "quick": cfg.quick,
        "budget": evidence.budget_block(cfg.train, cfg.init_steps, None, grid_sizes=cfg.grid_sizes),
        "quality": {"key": "w2", "label": "W2 to the teacher's samples (exact teacher: p_0)", "higher_is_better": False},
        "quality_p0": {"key": "w2", "label": "W2 to p_0"},
        "metric_keys": ["E", "E_exact", *cells.QUALITY_KEYS, "final_loss"],
        "regimes": kept, "merged": merged, "verdicts": v, "verdicts_exact": v_exact,
        "floor": floor, "teacher": teacher, "curves": curves, "seeding": cfg.seeding.model_dump(),
        "timing": timing,
        "summary": evidence.summary_line(v, cfg.quick, "W2"),
    }
    if out is not None:
        cells.write_outputs(out, STUDY, metrics, table, plot)
        if curves:
            plot_curves(curves, out / "curves.png", ["E", "E_exact", "w2"], cfg.quick,
                        "Solver ablation: training-budget curves", floor=floor)
    return metrics


def plot(metrics: dict, path) -> list:
    """E, E_exact, W2 and the variance ratio against N per solver; CD dashed, Direct CD solid."""
    regs = metrics["regimes"]
    solvers = list(dict.fromkeys(r["params"]["solver"] for r in regs))
    keys = ["E", "E_exact", "w2", "variance_ratio"]
    fig, axes = plotting.new_figure(1, len(keys), size=(3.4, 3.6))
    for j, key in enumerate(keys):
        ax = axes[0, j]
        for i, s in enumerate(solvers):
            rs = sorted([r for r in regs if r["params"]["solver"] == s], key=lambda r: r["params"]["N"])
            Ns = [r["params"]["N"] for r in rs]
            for m, ls in (("cd", "--"), ("direct_cd", "-")):
                if not all(key in r["methods"][m] for r in rs):
                    continue
                ax.errorbar(Ns, [r["methods"][m][key]["mean"] for r in rs],
                            yerr=[r["methods"][m][key]["std"] for r in rs], ls=ls, marker="o", ms=3, capsize=2,
                            color=f"C{i}", label=f"{plotting.solver_name(s)}, {plotting.method_name(m)}")
        if key in ("w2", "variance_ratio"):
            plotting.floor_band(ax, metrics["floor"].get(key))
        if key != "variance_ratio":
            ax.set_yscale("log")
        ax.set_xscale("log")
        plotting.tidy_log_axes(ax)
        Ns_all = sorted({r["params"]["N"] for r in regs})
        ax.set_xticks(Ns_all, [str(n) for n in Ns_all])
        ax.set_xlabel(plotting.label("grid_size"), fontsize=8)
        plotting.label_axes(ax, key)
    plotting.legend_outside(fig, axes, ncol=4)
    fig.suptitle(plotting.title("Solver ablation (exact teacher): mean ± std over seeds", metrics["quick"]), fontsize=9)
    return plotting.save(fig, path, rect=(0, 0.17, 1, 0.95))


def table(metrics: dict) -> str:
    fmt = common.fmt
    lines = [f"# {STUDY}", "", metrics["summary"], "", cells.budget_line(metrics), "",
             cells.markdown_table(metrics["regimes"], TABLE_KEYS, metrics["quick"]), "",
             cells.merged_note(metrics["merged"]), "",
             "Verdicts (quality W2 to p_0, E against the teacher solver):", "", cells.verdict_table(metrics["verdicts"]),
             "", "Verdicts with E against the exact ODE:", "", cells.verdict_table(metrics["verdicts_exact"]), "",
             "Teacher solver alone (its samples against p_0; its endpoint against the exact ODE), mean over seeds:", "",
             "| solver N | E_solver_vs_exact | w2 | mmd2 | modes_covered |", "|---|---|---|---|---|"]
    for k, v in metrics["teacher"].items():
        g = lambda key: fmt(v[key]["mean"]) if key in v else "-"  # noqa: E731
        lines.append(f"| {k} | {g('E_solver_vs_exact')} | {g('w2')} | {g('mmd2')} | {g('modes_covered')} |")
    lines += ["", cells.floor_line(metrics["floor"], ("w2", "mmd2"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, SolverAblationConfig, QUICK, run, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
