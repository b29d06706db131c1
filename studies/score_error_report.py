"""studies.score_error, second half: regimes with statistics, reference rows, floors, table and figures.

* ``build_regimes``: one regime per (teacher, solver, init) in the ``studies.evidence`` schema, with
  per-seed values of every metric for CD and Direct CD, convergence flags, paired differences,
  bootstrap intervals over evaluation samples (``E_solver``, ``E_true_ode``, ``nll_p0``,
  ``mode_precision_p0``, ``precision_teacher``), the mechanism decompositions and covariance spectra.
* ``reference_rows``: each teacher's solver chains and exact ODE, and the true ODE, scored like a student.
* ``floors``: finite-sample floors as distributions: ``*_p0`` between two independent p_0 samples; ``*_teacher``
  between two samples of the teacher's distribution (exact teacher: p_0; ``wrong_gmm``: its mixture
  q_delta, sampled exactly; learned / nonconservative teachers: the p_0 floor, marked approximate).
* ``write``: ``table.md`` and the figures (PNG + PDF): ``samples``, ``metrics_vs_score_error`` (one
  series per teacher family: wrong_gmm deltas and learned budgets are different axes of error, never
  joined), ``curves`` when curves are on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from toys.metrics import finite_sample_floor

from . import common, evidence, plotting
from .cells import collect, floor_line, merged_note, verdict_table

__all__ = ["build_regimes", "reference_rows", "floors", "split_curves", "render_table", "plot_samples",
           "plot_metrics", "write", "TABLE_KEYS", "PLOT_KEYS"]

TABLE_KEYS = ("E_solver", "E_true_ode", "w2_teacher", "w2_p0", "mmd2_p0", "mode_precision_p0", "nll_p0",
              "variance_ratio_teacher", "mech_correlation")
PLOT_KEYS = ("E_solver", "E_true_ode", "w2_teacher", "w2_p0", "mmd2_p0", "mode_precision_p0",
             "variance_ratio_teacher", "mech_correlation")
EXACT_TOL = 1e-10  # score errors below this are float rounding of an exact teacher
FAMILY_MARKERS = {"exact": "*", "wrong_gmm": "o", "learned": "s", "nonconservative": "^"}


def _numeric_keys(row: dict) -> list[str]:
    skip = {"score_error", "seed"}
    return [k for k, v in row.items() if isinstance(v, float) and k not in skip and not k.startswith("_")]


def build_regimes(cfg, runs: Sequence[dict], per_sample: dict, converged: dict) -> list[dict]:
    """One regime per (teacher, solver, init), methods paired by seed (the config's seed order)."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in runs:
        groups.setdefault((r["teacher"], r["solver"], r["init"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    regimes = []
    multi_init = len(cfg.inits) > 1
    for (teacher, solver, init), by_method in groups.items():
        first = next(iter(next(iter(by_method.values())).values()))
        per, conv, samples, mech, spectra = {}, {}, {}, {}, {}
        for method, by_seed in by_method.items():
            rows = [by_seed[s] for s in cfg.seeds]
            per[method] = {k: [r[k] for r in rows] for k in _numeric_keys(rows[0])}
            keys = [(teacher, solver, init, method, s) for s in cfg.seeds]
            if all(k in converged for k in keys):
                conv[method] = [converged[k] for k in keys]
            samples[method] = {k: [per_sample[key][k] for key in keys] for k in per_sample[keys[0]]}
            if "_mechanism" in rows[0]:
                mech[method] = [r["_mechanism"] for r in rows]
            s_student = np.mean([r["_spectrum"] for r in rows], axis=0)
            s_teacher = np.mean([r["_spectrum_teacher"] for r in rows], axis=0)
            spectra[method] = {"student": s_student.tolist(), "teacher": s_teacher.tolist(),
                               "ratio": (s_student / np.maximum(s_teacher, 1e-300)).tolist()}
        label = f"{teacher} / {solver}" + (f" / init={init}" if multi_init else "")
        se = [r["score_error"] for r in (by_method[m][s] for m in by_method for s in cfg.seeds)]
        params = {"teacher": teacher, "family": first["family"], "solver": solver, "init": init,
                  "score_error": float(np.mean(se))}
        reg = evidence.regime_entry(label, first["family"], params, per,
                                    switches={"score_error": float(np.mean(se)), "decoder": "identity"},
                                    converged=conv or None)
        reg["eval_intervals"] = evidence.eval_intervals({m: samples[m] for m in evidence.METHODS if m in samples},
                                                        cfg.eval.n_resamples, seed=cfg.eval.seed)
        reg["mechanism"] = mech
        reg["spectra"] = spectra
        regimes.append(evidence.add_differences(reg))
    return regimes


def reference_rows(cfg, worlds: dict, W) -> list[dict]:
    """Per teacher: its solver chains (``chain:<solver>``) and exact ODE (``teacher_ode``), and the true
    ODE, each scored like a student (``stat`` over seeds)."""
    from .score_error_world import TEACHER_QUALITY_KEYS, errors, quality

    ev = cfg.eval
    out = []
    for spec in cfg.teachers:
        cands: dict[str, list[dict]] = {}
        for seed in cfg.seeds:
            w, sd = worlds[(spec.label, seed)], W.seed_data(seed)
            for name, solver, x in [(f"chain:{s}", s, w.chains[s]) for s in cfg.solvers] + [("teacher_ode", "-", w.ode_end)]:
                row = {k: float(v.mean()) for k, v in errors(x, w.chains.get(solver), w.ode_end, sd.true_ode).items()}
                row.update(quality(x, sd.reference, W.gmm, ev, "p0"))
                if ev.quality_vs_teacher:
                    row.update(quality(x, w.ode_samples, None, ev, "teacher", TEACHER_QUALITY_KEYS))
                cands.setdefault((name, solver), []).append(row)
        se = float(np.mean([worlds[(spec.label, s)].score_error for s in cfg.seeds]))
        for (name, solver), rows in cands.items():
            out.append({"teacher": spec.label, "family": spec.kind, "score_error": se, "method": name, "solver": solver,
                        **{k: common.stat(v) for k, v in collect(rows).items()}})
    rows = []
    for seed in cfg.seeds:
        sd = W.seed_data(seed)
        row = {k: float(v.mean()) for k, v in errors(sd.true_ode, None, sd.true_ode, sd.true_ode).items()}
        row.update(quality(sd.true_ode, sd.reference, W.gmm, ev, "p0"))
        rows.append(row)
    out.append({"teacher": "true", "family": "exact", "score_error": 0.0, "method": "true_ode", "solver": "-",
                **{k: common.stat(v) for k, v in collect(rows).items()}})
    return out


def floors(cfg, W, worlds: dict) -> tuple[dict, dict]:
    """``(floor_p0, floor_teacher)``: metric floors as distributions (``eval.floor_draws`` draws)."""
    from .score_error_world import QUALITY_KEYS, TEACHER_QUALITY_KEYS

    ev = cfg.eval
    if not ev.floor:
        return {}, {}

    def floor_of(gmm, keys, suffix, with_gmm):
        def draw(s):
            q = finite_sample_floor(gmm, ev.num_samples, seed=s, max_points=ev.max_points, shrinkage=True,
                                    gmm=gmm if with_gmm else None)
            return {f"{k}_{suffix}": float(q[k]) for k in keys if k in q}
        return evidence.floor_block(draw, ev.floor_draws, seed=ev.seed)

    floor_p0 = floor_of(W.gmm, QUALITY_KEYS, "p0", True)
    teacher: dict[str, dict] = {}
    p0_as_teacher = None
    for spec in cfg.teachers:
        den = worlds[(spec.label, cfg.seeds[0])].denoiser
        if spec.kind == "wrong_gmm":
            teacher[spec.label] = {"approximate": False, **floor_of(den.gmm, TEACHER_QUALITY_KEYS, "teacher", False)}
        else:
            if p0_as_teacher is None:
                p0_as_teacher = {f"{k}_teacher": floor_p0[f"{k}_p0"] for k in TEACHER_QUALITY_KEYS if f"{k}_p0" in floor_p0}
            teacher[spec.label] = {"approximate": spec.kind != "exact", **p0_as_teacher}
    return floor_p0, teacher


def split_curves(recorder, members: Sequence, cfg, converged: dict) -> list[dict]:
    """One curve per (teacher, solver) block of members; the last step's flags fill ``converged``."""
    n = len(cfg.seeds)
    out = []
    for b in range(len(members) // n):
        w, solver, _, init = members[b * n]
        curve = recorder.to_dict(slice(b * n, (b + 1) * n), label=f"{w.spec.label} / {solver} / init={init}",
                                 params={"teacher": w.spec.label, "solver": solver, "init": init})
        for method, flags in curve["converged"].items():
            if flags and flags[-1] is not None:
                for seed, f in zip(cfg.seeds, flags[-1]):
                    converged[(w.spec.label, solver, init, method, seed)] = f
        out.append(curve)
    return out


# --- table -------------------------------------------------------------------------------------------

def render_table(metrics: dict, cfg) -> str:
    quick = metrics["quick"]
    fmt = common.fmt
    intro = [f"# score_error{' — ' + plotting.SMOKE_LABEL if quick else ''}", "", metrics["summary"], "",
             f"Score-error sweep on {cfg.preset}, schedule {cfg.schedule} (timestep_offset {cfg.timestep_offset}), "
             f"grid {cfg.grid} N={cfg.grid_size}, {len(cfg.seeds)} seeds (mean ± std over seeds; every seed varies "
             f"{', '.join(cfg.seeding.varied())}). E_* = eq. 6 MSE of the one-step sample against the teacher solver "
             f"chain / the true ODE; *_teacher against the teacher's exact-ODE samples (primary), *_p0 against p_0; "
             f"mech_correlation = corr(teacher error, student's own error) (< 0: the student corrects the teacher).",
             "", _budget(metrics), ""]
    head = ["regime", "score err", "method", *TABLE_KEYS, "converged"]
    rows = []
    for r in metrics["regimes"]:
        for m, vals in r["methods"].items():
            conv = r.get("converged", {}).get(m)
            rows.append([r["label"], fmt(r["params"]["score_error"]), plotting.method_name(m),
                         *[common.fmt_stat(vals.get(k)) for k in TABLE_KEYS], f"{sum(conv)}/{len(conv)}" if conv else "-"])
    parts = intro + [("**" + plotting.SMOKE_LABEL + "**\n\n" if quick else "") + common.markdown_table(head, rows), "",
                     merged_note(metrics["merged"]), "",
                     "Verdicts, primary (quality: W2 to the teacher's samples; E = E_solver):", "",
                     verdict_table(metrics["verdicts"]), "",
                     "Verdicts, second question (quality: W2 to p_0):", "", verdict_table(metrics["verdicts_p0"]), ""]
    ref_head = ["teacher", "score err", "reference", "solver", "E_solver", "E_true_ode", "w2_p0", "mmd2_p0",
                "mode_precision_p0", "w2_teacher"]
    ref_rows = [[r["teacher"], fmt(r["score_error"]), f"*{r['method']}*", r["solver"],
                 *[common.fmt_stat(r.get(k)) for k in ref_head[4:]]] for r in metrics["references"]]
    parts += ["References (no student; mean ± std over seeds):", "", common.markdown_table(ref_head, ref_rows), ""]
    if metrics["floor"]:
        parts.append(floor_line({k[:-3]: v for k, v in metrics["floor"].items()}, ("w2", "mmd2", "mode_precision", "nll")))
    return "\n".join(parts)


def _budget(metrics: dict) -> str:
    b = metrics["budget"]
    return evidence.budget_line(b, f"target EMA rate {b['ema_rate']:g} (0 = stop-gradient), init "
                                   f"{evidence.init_text(b, ', '.join(b['inits']))}")


# --- figures -----------------------------------------------------------------------------------------

def plot_samples(path, metrics: dict, cfg, W, worlds: dict, outputs: dict) -> list:
    """Rows: teachers. Columns: p_0 data, the teacher's exact-ODE samples, then each (solver, method)'s
    one-step samples (first seed, first init); merged solvers are one column named together."""
    solvers = list(dict.fromkeys(r["params"]["solver"] for r in metrics["regimes"]))
    combos = [(s, m) for s in solvers for m in cfg.methods]
    fig, axes = plotting.new_figure(len(cfg.teachers), 2 + len(combos), size=(2.0, 2.0))
    seed, init = cfg.seeds[0], cfg.inits[0]
    sd = W.seed_data(seed)
    lim = 1.0 + 4 * 0.1 + 0.6
    n_show = min(1000, sd.reference.shape[0])
    for i, spec in enumerate(cfg.teachers):
        w = worlds[(spec.label, seed)]
        panels = [("data p_0", sd.reference, "k"), ("teacher ODE", w.ode_samples, "0.3")]
        for solver, method in combos:
            x = outputs[(spec.label, solver.split("=")[0], init, method, seed)]
            panels.append((f"{plotting.method_name(method)}\n{plotting.solver_name(solver)}", x,
                           plotting.METHOD_COLORS[method]))
        for j, (name, x, color) in enumerate(panels):
            ax = axes[i, j]
            x = x[:n_show].cpu()
            ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, color=color, rasterized=True)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if i == 0:
                ax.set_title(name, fontsize=7)
            if j == 0:
                se = "0 (exact)" if w.score_error < EXACT_TOL else common.fmt(w.score_error)
                ax.set_ylabel(f"{spec.label}\nscore err {se}", fontsize=7)
    fig.suptitle(plotting.title(f"One-step samples (seed {seed}, {metrics['budget']['train_steps']} steps) beside "
                                f"p_0 and the teacher's exact-ODE samples; axes in data units", metrics["quick"]),
                 fontsize=8)
    return plotting.save(fig, path, rect=(0, 0, 1, 0.95))


def _x_positions(regimes: Sequence[dict]) -> tuple[dict[float, float], float]:
    errs = sorted({r["params"]["score_error"] for r in regimes})
    exact_x = min([e for e in errs if e > EXACT_TOL], default=1e-3) / 3
    return {e: (e if e > EXACT_TOL else exact_x) for e in errs}, exact_x


def plot_metrics(path, metrics: dict, cfg) -> list:
    """Each metric against the teacher's score error: one series per (teacher family, method, solver),
    mean ± std over seeds; teacher families are never joined (marker = family); series at one score
    error are spread slightly along x (log scale) so none hides another; grey: the teacher's own solver
    chains; bands: the finite-sample floor."""
    import matplotlib.ticker

    regimes = [r for r in metrics["regimes"] if r["params"]["init"] == cfg.inits[0]]
    keys = [k for k in PLOT_KEYS if any(k in m for r in regimes for m in r["methods"].values())]
    if not keys:
        return []
    ncols = 4
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plotting.new_figure(nrows, ncols, size=(3.3, 2.8))
    xpos, exact_x = _x_positions(regimes)
    families = list(dict.fromkeys(r["params"]["family"] for r in regimes))
    solvers = list(dict.fromkeys(r["params"]["solver"] for r in regimes))
    series = [(m, s) for m in cfg.methods for s in solvers]
    shift = {ms: 10 ** (0.025 * (i - (len(series) - 1) / 2)) for i, ms in enumerate(series)}
    for a, key in enumerate(keys):
        ax = axes[a // ncols, a % ncols]
        for fam in families:
            for method, solver in series:
                rows = sorted((r for r in regimes if r["params"]["family"] == fam and r["params"]["solver"] == solver
                               and key in r["methods"].get(method, {})), key=lambda r: r["params"]["score_error"])
                if not rows:
                    continue
                x = [xpos[r["params"]["score_error"]] * shift[(method, solver)] for r in rows]
                mu = [r["methods"][method][key]["mean"] for r in rows]
                sd = [r["methods"][method][key]["std"] for r in rows]
                ax.errorbar(x, mu, yerr=sd, ls=plotting.SOLVER_STYLES.get(solver.split("=")[0], "-"), lw=1,
                            marker=FAMILY_MARKERS.get(fam, "o"), ms=4, capsize=2,
                            color=plotting.METHOD_COLORS[method],
                            label=f"{plotting.method_name(method)}, {plotting.solver_name(solver)}")
        for fam in families:
            ax.plot([], [], FAMILY_MARKERS.get(fam, "o"), color="k", ms=4, ls="none", label=f"teacher family: {fam}")
        for ref in metrics["references"]:
            if ref["method"].startswith("chain:") and key in ref and key != "E_solver" and ref["score_error"] in xpos:
                ax.scatter([xpos[ref["score_error"]]], [ref[key]["mean"]], marker="_", s=80, color="0.4", zorder=3,
                           label="teacher's own solver chain")
        fl = metrics["floor"].get(key) or (metrics["floor_teacher"].get(cfg.teachers[0].label, {}).get(key)
                                           if key.endswith("_teacher") else None)
        if isinstance(fl, dict) and "values" in fl:
            plotting.floor_band(ax, fl)
        if key.startswith("E_"):
            ax.set_yscale("log")
            plotting.tidy_log_axes(ax)
        elif key.startswith("mmd2"):
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xscale("log")
        ticks = sorted(set(xpos.values()))
        ax.set_xticks(ticks, ["exact" if t == exact_x else common.fmt(t, 2) for t in ticks], fontsize=6)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(lo / 10 ** 0.15, hi * 10 ** 0.15)
        plotting.label_axes(ax, key)
        ax.set_xlabel(plotting.label("score_error"), fontsize=6)
        ax.tick_params(labelsize=6)
    for b in range(len(keys), nrows * ncols):
        axes[b // ncols, b % ncols].axis("off")
    plotting.legend_outside(fig, axes, ncol=4)
    fig.suptitle(plotting.title(f"Metrics against the teacher's score error (mean ± std over {len(cfg.seeds)} seeds, "
                                f"{metrics['budget']['train_steps']} steps)", metrics["quick"]), fontsize=9)
    return plotting.save(fig, path, rect=(0, 0.12, 1, 0.96))


def write(out: Path, metrics: dict, cfg, W, worlds: dict, outputs: dict) -> None:
    """``metrics.json``, ``table.md`` and (``cfg.plots``) the figures into ``out``."""
    from .curves import plot_curves

    common.write_json(out / "metrics.json", metrics)
    common.write_table(out, render_table(metrics, cfg), echo=False)
    if cfg.plots:
        plot_samples(out / "samples.png", metrics, cfg, W, worlds, outputs)
        plot_metrics(out / "metrics_vs_score_error.png", metrics, cfg)
        if metrics["curves"]:
            keys = [k for k in ("E_solver", "E_true_ode", "w2_teacher", "mech_correlation")
                    if k in (cfg.curves.keys or [])]
            fl = {k: v for k, v in {**metrics["floor"], **metrics["floor_teacher"].get(cfg.teachers[0].label, {})}.items()
                  if isinstance(v, dict)}
            plot_curves(metrics["curves"], out / "curves.png", keys or ["E_solver"], metrics["quick"],
                        "Score error: training-budget curves", floor=fl, max_rows=8)
