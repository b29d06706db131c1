"""Score approximation (explanation 1): how does the teacher's score error change CD vs Direct CD?

``python -m studies.score_error [--quick] [--config FILE] [--set key=value ...] [--out DIR]``

Sweep: teachers (``toys.scores.make_teacher``: the exact GMM denoiser, ``wrong_gmm`` at several
deltas, a DSM-``learned`` MLP) x method {cd, direct_cd} x teacher solver {ddim, euler, heun} x seeds,
on ``ring8`` with the SDXL noise schedule and the LCM/paper skip grid. All students of one method
train at once as one batched ensemble (``toys.ensemble``; member = (teacher, solver, seed)), each
member from its own route (teacher, solver, Direct CD target pool). The pools of every route share
the same training pairs (x0, n, noise), so CD and Direct CD see identical data.

Per trained student, from a fixed evaluation noise ``x_T ~ p_T`` (``T = t_N``) shared by every run:

* ``E_solver``  — paper eq. 6: ``mean (f_theta(x_T, T) - f_solver(x_T, T, t_0))^2`` against the
  teacher's own solver chain (the target Direct CD regresses on);
* ``E_teacher_ode`` — the same against the teacher's exact PF-ODE (adaptive dopri5, float64);
* ``E_true_ode`` — the same against the TRUE PF-ODE (adaptive solve of the exact GMM denoiser);
* sample quality (``toys.metrics.sample_quality``) of the one-step samples against ``p_0``
  (``*_p0``: an independent reference sample) and against the teacher's distribution (``*_teacher``:
  the teacher's exact-ODE samples from independent noise).

Reference rows per teacher: the teacher's solver chains and its exact ODE, evaluated the same way
(and the finite-sample floor of the metrics). The x axis of the plots is the teacher's score error
``toys.scores.score_error`` (eps units, mean over a timestep grid). Results: ``config.json``,
``metrics.json``, ``table.md`` (printed), ``samples.png`` and ``metrics_vs_score_error.png``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from odecm.cli import run_main
from odecm.config import SolverName, StrictModel
from odecm.grids import make_grid
from odecm.metrics import per_sample_sq_error
from odecm.schedules import make_schedule
from odecm.solvers import solve, solve_adaptive
from toys.ensemble import Route, TargetPool, TrainConfig, init_from_teacher, make_ensemble_student, train_ensemble
from toys.gmm import GaussianMixture, make_preset
from toys.metrics import HIGHER_IS_BETTER, finite_sample_floor, sample_quality
from toys.networks import NetworkConfig
from toys.scores import make_teacher, score_error

from . import common

Tensor = torch.Tensor
STUDY = "score_error"

#: sample-quality keys kept (vs p_0 and vs the teacher's distribution)
QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "mode_precision", "modes_covered", "nll")
#: columns of table.md
TABLE_KEYS = ("E_solver", "E_teacher_ode", "E_true_ode", "w2_p0", "mmd2_p0", "mode_precision_p0", "nll_p0",
              "w2_teacher", "mmd2_teacher")


class TeacherSpec(StrictModel):
    """One teacher of the sweep: ``make_teacher(kind, gmm, schedule, **options)``."""

    label: str
    kind: Literal["exact", "wrong_gmm", "nonconservative", "learned"]
    delta: float | None = Field(None, ge=0, description="wrong_gmm / nonconservative size")
    budget: int | None = Field(None, ge=0, description="learned: DSM training steps")
    seed: int = 0

    def options(self) -> dict[str, Any]:
        if self.kind in ("wrong_gmm", "nonconservative"):
            return {"delta": 0.1 if self.delta is None else self.delta,
                    **({"seed": self.seed} if self.kind == "wrong_gmm" else {})}
        if self.kind == "learned":
            return {"budget": 2000 if self.budget is None else self.budget, "seed": self.seed}
        return {}


class EvalSettings(StrictModel):
    num_samples: int = Field(2000, ge=10, description="evaluation noise x_T (and reference) sample size")
    max_points: int = Field(800, ge=10, description="subsample for W2 / MMD / k-NN metrics")
    seed: int = 777
    ode_rtol: float = Field(1e-6, gt=0)
    ode_atol: float = Field(1e-8, gt=0)
    score_error_samples: int = Field(2048, ge=16, description="points per timestep for toys.scores.score_error")
    quality_vs_teacher: bool = True
    floor: bool = Field(True, description="finite-sample floor of the metrics (two independent p_0 samples)")


class ScoreErrorConfig(StrictModel):
    renamed_keys = {"num_steps": "grid_size"}

    preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso"] = "ring8"
    schedule: Literal["sdxl", "vp", "vp_cosine", "edm"] = "sdxl"
    grid: Literal["skip", "uniform", "karras"] = "skip"
    grid_size: int = Field(20, ge=1, description="N grid intervals (skip needs N | 1000)")
    boundary: Literal["lcm", "edm"] = "lcm"
    teachers: list[TeacherSpec] = Field(default_factory=lambda: [
        TeacherSpec(label="exact", kind="exact"),
        TeacherSpec(label="wrong_gmm(0.1)", kind="wrong_gmm", delta=0.1),
        TeacherSpec(label="wrong_gmm(0.3)", kind="wrong_gmm", delta=0.3),
        TeacherSpec(label="learned(2000)", kind="learned", budget=2000),
    ])
    methods: list[Literal["cd", "direct_cd"]] = ["cd", "direct_cd"]
    solvers: list[SolverName] = ["ddim", "euler", "heun"]
    seeds: list[int] = [0, 1, 2]
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, lr=2e-3, pool_size=65536)
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start (toys.ensemble.init_from_teacher)")
    eval: EvalSettings = EvalSettings()
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    plots: bool = True

    @model_validator(mode="after")
    def _check(self):
        labels = [t.label for t in self.teachers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"teachers: labels must be unique, got {labels}")
        if not self.teachers or not self.methods or not self.solvers or not self.seeds:
            raise ValueError("teachers, methods, solvers and seeds must be non-empty")
        return self


#: ``--quick``: a reduced sweep (< 90 s on 2 shared cores)
QUICK: dict[str, Any] = {
    "teachers": [{"label": "exact", "kind": "exact"},
                 {"label": "wrong_gmm(0.3)", "kind": "wrong_gmm", "delta": 0.3}],
    "solvers": ["ddim", "heun"],
    "seeds": [0, 1],
    "network": {"width": 32, "depth": 2},
    "train": {"train_steps": 250, "batch_size": 64, "pool_size": 8192, "warmup_steps": 20},
    "eval": {"num_samples": 300, "max_points": 250, "score_error_samples": 256},
}


# --- the world -----------------------------------------------------------------------------------

@dataclass
class TeacherWorld:
    """A teacher and its fixed evaluation quantities."""

    spec: TeacherSpec
    denoiser: Any
    score_error: float
    ode_end: Tensor  # teacher's exact ODE from the shared x_T
    ode_samples: Tensor  # teacher's exact ODE from independent noise (its distribution)
    chains: dict[str, Tensor]  # solver -> chain endpoint from x_T
    pools: dict[str, TargetPool]


def _exact_ode(den: Any, x_T: Tensor, t_from: float, t_to: float, ev: EvalSettings) -> Tensor:
    """The denoiser's PF-ODE endpoint (adaptive dopri5 in float64; exact mixtures use their own routine)."""
    gmm = getattr(den, "gmm", None)
    if isinstance(gmm, GaussianMixture) and type(den).__name__ == "ExactGMMDenoiser":
        return gmm.exact_ode_solution(x_T.double(), t_from, t_to, den.schedule, rtol=ev.ode_rtol, atol=ev.ode_atol)
    with torch.no_grad():
        # float32 networks: looser tolerances than the float32 rounding of the vector field would allow
        x, _ = solve_adaptive(den, x_T.double(), t_from, t_to, rtol=max(ev.ode_rtol, 1e-5), atol=max(ev.ode_atol, 1e-6))
    return x.double()


def _quality(x: Tensor, ref: Tensor, gmm: GaussianMixture | None, ev: EvalSettings, suffix: str) -> dict[str, float]:
    q = sample_quality(x.double(), ref.double(), gmm=gmm, seed=ev.seed, max_points=ev.max_points)
    return {f"{k}_{suffix}": float(q[k]) for k in QUALITY_KEYS if k in q}


def _errors(x: Tensor, solver_end: Tensor | None, teacher_ode: Tensor, true_ode: Tensor) -> dict[str, float]:
    out = {"E_teacher_ode": float(per_sample_sq_error(x, teacher_ode).mean()),
           "E_true_ode": float(per_sample_sq_error(x, true_ode).mean())}
    if solver_end is not None:
        out["E_solver"] = float(per_sample_sq_error(x, solver_end).mean())
    return out


def run(cfg: ScoreErrorConfig, out_dir, progress: bool = True) -> dict[str, Any]:
    """Run the sweep; write config/metrics/table/plots into ``out_dir``; return the metrics dict."""
    from pathlib import Path

    out_dir = Path(out_dir)
    common.set_threads(cfg.threads)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    ev = cfg.eval
    gmm = make_preset(cfg.preset)
    schedule = make_schedule(cfg.schedule)
    grid = make_grid(cfg.grid, schedule, cfg.grid_size)
    t_T, t_0 = float(grid[-1]), float(grid[0])
    true_den = gmm.exact_denoiser(schedule)
    sample_data = lambda n, g: gmm.sample_p0(n, g)[0]  # noqa: E731

    # 1. fixed evaluation data: shared noise x_T, an independent x_T' (distributions), a p_0 reference
    with common.Timer() as tm:
        g = torch.Generator().manual_seed(ev.seed)
        x_T = gmm.sample_pt(ev.num_samples, t_T, schedule, generator=g, dtype=torch.float64)[0]
        x_T_ind = gmm.sample_pt(ev.num_samples, t_T, schedule, generator=g, dtype=torch.float64)[0]
        reference = gmm.sample_p0(ev.num_samples, torch.Generator().manual_seed(ev.seed + 1), dtype=torch.float64)[0]
        true_ode = _exact_ode(true_den, x_T, t_T, t_0, ev)
        floor = finite_sample_floor(gmm, ev.num_samples, seed=ev.seed + 10, max_points=ev.max_points) if ev.floor else {}
    timings["eval_setup"] = tm.seconds

    # 2. teachers: score error, exact ODE, solver chains, Direct CD target pools (shared training pairs)
    worlds: list[TeacherWorld] = []
    with common.Timer() as tm:
        for spec in tqdm(cfg.teachers, desc="teachers", disable=not progress, leave=False):
            den = make_teacher(spec.kind, gmm, schedule, **spec.options())
            se = score_error(den, gmm, schedule, n=ev.score_error_samples,
                             generator=torch.Generator().manual_seed(ev.seed + 3)).mean
            ode_end = _exact_ode(den, x_T, t_T, t_0, ev)
            ode_samples = _exact_ode(den, x_T_ind, t_T, t_0, ev)
            with torch.no_grad():
                chains = {s: solve(s, den, x_T.float(), grid, grid.numel() - 1).x.double() for s in cfg.solvers}
            pools = {s: TargetPool.build(den, s, grid, schedule, sample_data, cfg.train.pool_size, cfg.train.pool_seed)
                     for s in cfg.solvers}
            worlds.append(TeacherWorld(spec, den, float(se), ode_end, ode_samples, chains, pools))
    timings["teachers_and_pools"] = tm.seconds

    # 3. members: (teacher, solver, seed), teacher-major so that routes form contiguous blocks
    members = [(w, s, seed) for w in worlds for s in cfg.solvers for seed in cfg.seeds]
    routes = [Route(w.denoiser, s, w.pools[s]) for w, s, _ in members]
    seeds = [seed for _, _, seed in members]
    init_state = None
    if cfg.init_steps:
        with common.Timer() as tm:
            st0 = make_ensemble_student(cfg.network, schedule, seeds, boundary=cfg.boundary, t_min=t_0)
            init_from_teacher(st0, routes, grid, sample_data, cfg.init_steps, cfg.train.batch_size, cfg.train.lr,
                              progress="init" if progress else False)
            init_state = {k: v.clone() for k, v in st0.net.state_dict().items()}
        timings["init"] = tm.seconds

    runs: list[dict[str, Any]] = []
    outputs: dict[str, Tensor] = {}
    for method in tqdm(cfg.methods, desc="methods", disable=not progress, leave=False):
        student = make_ensemble_student(cfg.network, schedule, seeds, boundary=cfg.boundary, t_min=t_0)
        if init_state is not None:
            student.net.load_state_dict(init_state)
        train_cfg = cfg.train.model_copy(update={"method": method})
        hist = train_ensemble(train_cfg, student, routes, grid, sample_data,
                              progress=f"train {method} (E={len(members)})" if progress else False)
        timings[f"train_{method}"] = hist.seconds
        final_loss = hist.final_loss()
        with common.Timer() as tm:
            out = student.one_step(x_T.float(), t_T).double()  # (E, M, d)
            outputs[method] = out
            for m, (w, solver, seed) in enumerate(tqdm(members, desc=f"eval {method}", disable=not progress,
                                                       leave=False)):
                x = out[m]
                row = {"teacher": w.spec.label, "score_error": w.score_error, "method": method, "solver": solver,
                       "seed": seed, "final_loss": final_loss[m],
                       **_errors(x, w.chains[solver], w.ode_end, true_ode), **_quality(x, reference, gmm, ev, "p0")}
                if ev.quality_vs_teacher:
                    row.update(_quality(x, w.ode_samples, None, ev, "teacher"))
                runs.append(row)
        timings[f"eval_{method}"] = tm.seconds

    # 4. reference rows: each teacher's solver chains and exact ODE
    references: list[dict[str, Any]] = []
    with common.Timer() as tm:
        for w in worlds:
            cands = [(f"chain:{s}", s, w.chains[s]) for s in cfg.solvers] + [("teacher_ode", "-", w.ode_end)]
            for name, solver, x in cands:
                row = {"teacher": w.spec.label, "score_error": w.score_error, "method": name, "solver": solver,
                       **_errors(x, w.chains.get(solver), w.ode_end, true_ode), **_quality(x, reference, gmm, ev, "p0")}
                if ev.quality_vs_teacher:
                    row.update(_quality(x, w.ode_samples, None, ev, "teacher"))
                references.append(row)
        true_row = {"teacher": "true", "score_error": 0.0, "method": "true_ode", "solver": "-",
                    **_errors(true_ode, None, true_ode, true_ode), **_quality(true_ode, reference, gmm, ev, "p0")}
        references.append(true_row)
    timings["references"] = tm.seconds

    summary = summarise(runs)
    timings["total"] = time.perf_counter() - start
    metrics = {
        "study": STUDY,
        "teachers": {w.spec.label: {"kind": w.spec.kind, **w.spec.options(), "score_error": w.score_error,
                                    "pool_build_seconds": {s: p.build_seconds for s, p in w.pools.items()}}
                     for w in worlds},
        "summary": summary,
        "references": references,
        "floor_p0": floor,
        "runs": runs,
        "timings": timings,
        "higher_is_better": sorted(HIGHER_IS_BETTER),
    }
    common.write_json(out_dir / "metrics.json", metrics)
    table = render_table(summary, references, floor, cfg)
    common.write_table(out_dir, table, echo=False)
    if cfg.plots:
        plot_samples(out_dir / "samples.png", worlds, outputs, members, reference, cfg)
        plot_metrics(out_dir / "metrics_vs_score_error.png", summary, references, cfg)
    return metrics


# --- summaries, table and plots -------------------------------------------------------------------

def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (teacher, method, solver): every numeric metric as ``common.stat`` over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["teacher"], r["method"], r["solver"]), []).append(r)
    out = []
    for (teacher, method, solver), rows in groups.items():
        keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "score_error"]
        out.append({"teacher": teacher, "score_error": rows[0]["score_error"], "method": method, "solver": solver,
                    "seeds": [r["seed"] for r in rows], **{k: common.stat(r[k] for r in rows) for k in keys}})
    return out


def render_table(summary, references, floor, cfg: ScoreErrorConfig) -> str:
    head = ["teacher", "score err", "method", "solver", *TABLE_KEYS]
    rows = []
    for s in summary:
        rows.append([s["teacher"], common.fmt(s["score_error"]), s["method"], s["solver"],
                     *[common.fmt_stat(s.get(k)) for k in TABLE_KEYS]])
    for r in references:
        rows.append([r["teacher"], common.fmt(r["score_error"]), f"*{r['method']}*", r["solver"],
                     *[common.fmt(r.get(k)) for k in TABLE_KEYS]])
    rows.append(["floor", "-", "*two p_0 samples*", "-", "-", "-", "-", common.fmt(floor.get("w2")),
                 common.fmt(floor.get("mmd2")), common.fmt(floor.get("mode_precision")), common.fmt(floor.get("nll")),
                 "-", "-"])
    intro = (f"Score-error sweep on {cfg.preset}, schedule {cfg.schedule}, grid {cfg.grid} N={cfg.grid_size}, "
             f"{len(cfg.seeds)} seeds (mean ± std). E_* = eq. 6 MSE of the one-step sample against the teacher "
             f"solver chain / teacher exact ODE / true ODE; *_p0 against p_0, *_teacher against the teacher's "
             f"exact-ODE samples. Rows in italics are references (no student).\n\n")
    return intro + common.markdown_table(head, rows)


EXACT_TOL = 1e-10  # score errors below this are float rounding of an exact teacher
METHOD_COLORS = {"cd": "tab:blue", "direct_cd": "tab:red"}
SOLVER_STYLES = {"ddim": "-", "euler": "--", "heun": ":"}
PLOT_KEYS = ("E_solver", "E_teacher_ode", "E_true_ode", "w2_p0", "mmd2_p0", "mode_precision_p0", "w2_teacher",
             "mmd2_teacher")


def plot_samples(path, worlds, outputs, members, reference, cfg: ScoreErrorConfig) -> None:
    """Rows: teachers. Columns: p_0 data, teacher ODE samples, then each (solver, method)'s one-step
    samples (first seed)."""
    combos = [(s, m) for s in cfg.solvers for m in cfg.methods if m in outputs]
    ncols = 2 + len(combos)
    fig, axes = common.new_figure(len(worlds), ncols, size=(2.1, 2.1))
    lim = 1.0 + 4 * 0.1 + 0.6
    n_show = min(1000, reference.shape[0])
    first_seed = cfg.seeds[0]
    for i, w in enumerate(worlds):
        panels = [("data p_0", reference), (f"teacher ODE", w.ode_samples)]
        for solver, method in combos:
            m = next(k for k, (ww, s, seed) in enumerate(members) if ww is w and s == solver and seed == first_seed)
            panels.append((f"{method} ({solver})", outputs[method][m]))
        for j, (title, x) in enumerate(panels):
            ax = axes[i, j]
            x = x[:n_show].cpu()
            ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color="k" if j < 2 else METHOD_COLORS.get(title.split()[0]),
                       rasterized=True)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{w.spec.label}\nscore err {common.fmt(w.score_error)}", fontsize=8)
    common.save_figure(fig, path)


def plot_metrics(path, summary, references, cfg: ScoreErrorConfig) -> None:
    """Each metric against the teacher's score error: mean over seeds with a ±std band per
    (method, solver); dashed grey: the teacher solver chains (references)."""
    import matplotlib.ticker

    keys = [k for k in PLOT_KEYS if k in summary[0]]
    ncols = 4
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = common.new_figure(nrows, ncols, size=(3.3, 2.7))
    errs = sorted({s["score_error"] for s in summary})
    floor_x = min([e for e in errs if e > EXACT_TOL], default=1e-3) / 3  # where the exact teacher sits
    xpos = lambda e: e if e > EXACT_TOL else floor_x  # noqa: E731
    for a, key in enumerate(keys):
        ax = axes[a // ncols, a % ncols]
        for method in cfg.methods:
            for solver in cfg.solvers:
                rows = sorted((s for s in summary if s["method"] == method and s["solver"] == solver),
                              key=lambda s: s["score_error"])
                if not rows:
                    continue
                x = [xpos(r["score_error"]) for r in rows]
                mu = [r[key]["mean"] for r in rows]
                sd = [r[key]["std"] for r in rows]
                ax.plot(x, mu, SOLVER_STYLES[solver], color=METHOD_COLORS[method], marker="o", ms=3,
                        label=f"{method} {solver}")
                ax.fill_between(x, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)],
                                color=METHOD_COLORS[method], alpha=0.15, lw=0)
        ref = sorted((r for r in references if r["method"].startswith("chain:") and key in r
                      and r.get(key) is not None), key=lambda r: r["score_error"])
        for solver in cfg.solvers:
            rr = [r for r in ref if r["solver"] == solver]
            if rr and key != "E_solver":
                ax.plot([xpos(r["score_error"]) for r in rr], [r[key] for r in rr], SOLVER_STYLES[solver],
                        color="0.5", lw=1, label=f"chain {solver}")
        ax.set_xscale("log")
        ax.set_xticks(sorted({xpos(e) for e in errs}))
        ax.set_xticklabels(["exact" if e <= EXACT_TOL else common.fmt(e, 2) for e in sorted(errs)], fontsize=6)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key.startswith("E_") or key.startswith("mmd2") or key.startswith("w2"):
            ax.set_yscale("symlog", linthresh=1e-4) if key.startswith("mmd2") else ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("teacher score error", fontsize=7)
        ax.tick_params(labelsize=7)
    for b in range(len(keys), nrows * ncols):
        axes[b // ncols, b % ncols].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    common.save_figure(fig, path, rect=(0, 0.05, 1, 1))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(STUDY, argv, description=__doc__.split("\n")[0])
    cfg = common.resolve_config(ScoreErrorConfig, args, quick=QUICK)
    if args.threads:
        cfg = cfg.model_copy(update={"threads": args.threads})
    out = common.results_folder(STUDY, args)
    common.save_config(out, cfg, argv=argv, quick=bool(args.quick))
    start = time.perf_counter()
    metrics = run(cfg, out, progress=args.progress)
    print((out / "table.md").read_text())
    print(f"\nresults in {out} ({time.perf_counter() - start:.0f} s)")
    return metrics


if __name__ == "__main__":
    run_main(main)
