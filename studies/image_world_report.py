"""Summaries, corrected verdicts, the table and the figures of ``studies.image_world``.

Verdicts (``studies.stats.classify_regimes``): one regime per trained cell (space, teacher, student,
solver); per seed ``dE = E_cd - E_dcd`` (E = ``E_solver``, the paper's eq. 6 against the teacher's
solver) and ``dQ = Q_dcd - Q_cd`` (Q a lower-is-better distance: ``fd_teacher``, the paper's protocol,
or ``fd_data``). "paradox" = Direct CD has the lower E *and* the worse Q, both paired t-intervals
excluding 0 at the Holm-corrected level over all cells counted. ``switch_effects`` lists, for every
paradox cell, the one-switch neighbours (teacher, space or student changed) where it is not a paradox.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from studies.stats import RegimeInput, classify_regimes

from . import common, plotting

__all__ = ["summarise", "verdicts", "switch_effects", "render_table", "write_outputs", "TABLE_KEYS", "LABELS"]

CELL_KEYS = ("space", "teacher", "student", "solver")
SWITCHES = ("teacher", "space", "student")
TABLE_KEYS = ("E_solver", "E_exact", "E_solver_pixel", "fd_teacher", "fd_data", "precision_data", "recall_data",
              "class_tv", "memorisation", "variance_ratio", "hf_power_ratio")
LABELS = {
    "E_solver": "E vs teacher solver (ODE space)", "E_exact": "E vs exact ODE (ODE space)",
    "E_solver_pixel": "E vs teacher solver (pixels)", "E_exact_pixel": "E vs exact ODE (pixels)",
    "fd_teacher": "FD to teacher samples (classifier features)", "fd_data": "FD to held-out data (classifier features)",
    "precision_data": "precision vs held-out", "recall_data": "recall vs held-out", "class_tv": "class TV to uniform",
    "memorisation": "share within RMS 0.1 of a training image", "variance_ratio": "total variance / teacher's",
    "hf_power_ratio": "high-frequency power / teacher's",
}
METHOD_COLORS = {"cd": "tab:blue", "direct_cd": "tab:red"}
CELL_STYLES = {("exact", "scratch"): "-", ("learned", "scratch"): "--", ("learned", "lora"): ":",
               ("exact", "mlp"): "-.", ("learned", "mlp"): (0, (1, 3))}


def cell_label(r: dict) -> str:
    return "/".join(str(r[k]) for k in CELL_KEYS)


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Per (cell, method): every numeric metric as ``common.stat`` over seeds, and the share converged."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in (*CELL_KEYS, "method")), []).append(r)
    out = []
    for key, rows in groups.items():
        nums = [k for k, v in rows[0].items() if isinstance(v, float)]
        out.append({**dict(zip((*CELL_KEYS, "method"), key)), "seeds": [r["seed"] for r in rows],
                    "converged": sum(bool(r["converged"]) for r in rows) / len(rows),
                    **{k: common.stat(r[k] for r in rows) for k in nums}})
    return out


def verdicts(runs: Sequence[dict], quality_key: str, quick: bool, e_key: str = "E_solver") -> dict[str, Any]:
    """``classify_regimes`` over every cell that has both methods (Holm, alpha 0.05), as a dict."""
    by_cell: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        by_cell.setdefault(cell_label(r), {}).setdefault(r["method"], []).append(r)
    regimes = []
    for label, methods in by_cell.items():
        if {"cd", "direct_cd"} - set(methods):
            continue
        cd = sorted(methods["cd"], key=lambda r: r["seed"])
        dcd = sorted(methods["direct_cd"], key=lambda r: r["seed"])
        if [r["seed"] for r in cd] != [r["seed"] for r in dcd]:
            raise ValueError(f"cell {label}: CD and Direct CD ran different seeds")
        regimes.append(RegimeInput.from_methods(
            label, [r[e_key] for r in cd], [r[e_key] for r in dcd], [r[quality_key] for r in cd],
            [r[quality_key] for r in dcd], quality_key=quality_key, quick=quick,
            params={k: cd[0][k] for k in CELL_KEYS}))
    vs = classify_regimes(regimes, alpha=0.05, method="holm", include_quick=quick)
    return {"e_key": e_key, **vs.to_dict()}


def switch_effects(verdict_set: dict[str, Any]) -> list[dict[str, str]]:
    """For each paradox cell, its one-switch neighbours that are not paradoxes: the switch that turns it on."""
    regs = verdict_set.get("regimes", [])
    by_params = {tuple(r["params"][k] for k in CELL_KEYS): r for r in regs}
    out = []
    for r in regs:
        if r["verdict"] != "paradox":
            continue
        p = r["params"]
        for i, sw in enumerate(CELL_KEYS):
            if sw not in SWITCHES:
                continue
            for key, other in by_params.items():
                if key[i] != p[sw] and all(key[j] == p[CELL_KEYS[j]] for j in range(len(CELL_KEYS)) if j != i):
                    if other["verdict"] != "paradox":
                        out.append({"cell": r["label"], "switch": sw, "off": key[i], "on": p[sw],
                                    "verdict_when_off": other["verdict"]})
    return out


def _interval(d: dict) -> str:
    lo, hi = d.get("low"), d.get("high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{common.fmt(d.get('mean'))} [-]"
    return f"{common.fmt(d['mean'])} [{common.fmt(lo)}, {common.fmt(hi)}]"


def render_table(cfg, m: dict[str, Any]) -> str:
    quick = " **(quick run: a smoke test, never evidence)**" if m["quick"] else ""
    w = m["world"]
    intro = (f"Image world{quick}: {w['data']['train']} training / {w['data']['test']} held-out images {w['data']['shape']}, "
             f"SDXL schedule (paper indexing), skip grid N = {cfg.grid_size}, {cfg.train.train_steps} steps x "
             f"{cfg.train.batch_size} per member, seeds {cfg.seeds} (mean ± std over seeds). E = eq. 6 MSE of the "
             f"one-step sample f(x_T, T); FD in the classifier's feature space (held-out accuracy "
             f"{w['classifier']['test_accuracy']:.3f}); metrics after decoding to pixels.\n\n")
    head = ["space", "teacher", "student", "solver", "method", "conv.", *TABLE_KEYS]
    rows = [[s["space"], s["teacher"], s["student"], s["solver"], s["method"], f"{s['converged']:.0%}",
             *[common.fmt_stat(s.get(k)) for k in TABLE_KEYS]] for s in m["summary"]]
    refs: dict[tuple, list[dict]] = {}
    for r in m["references"]:
        refs.setdefault((r["space"], r["reference"], r["solver"]), []).append(r)
    for (sp, name, solver), rr in refs.items():
        rows.append([sp, f"*{name}*", "-", solver, "-", "-",
                     *[common.fmt_stat(common.stat(r[k] for r in rr)) if k in rr[0] else "-" for k in TABLE_KEYS]])
    fl = m["floor_fd_data"]
    rows.append(["-", "*floor: train subset vs held-out*", "-", "-", "-", "-", "-", "-", "-", "-",
                 f"{common.fmt(fl['mean'])} ± {common.fmt(fl['std'], 2)}", *["-"] * (len(TABLE_KEYS) - 5)])
    h = m["heldout"]
    rows.append(["-", "*held-out images*", "-", "-", "-", "-", *["-"] * 7, common.fmt(h["class_tv"]),
                 common.fmt(h["memorisation"]), "-", "-"])
    out = intro + common.markdown_table(head, rows)
    for q, vs in m["verdicts"].items():
        out += (f"\n\nVerdicts on {q} (dE = E_cd - E_dcd > 0: Direct CD lower E; dQ = {q}_dcd - {q}_cd > 0: CD "
                f"better samples; paired t-intervals over seeds at the Holm-corrected level, "
                f"{vs['correction']['num_comparisons']} cells):\n\n")
        vrows = [[r["label"], _interval(r["dE"]), _interval(r["dQ"]), f"{r['level']:.4f}", r["verdict"]]
                 for r in vs["regimes"]]
        out += common.markdown_table(["cell", "dE [interval]", "dQ [interval]", "level", "verdict"], vrows)
        eff = m["switch_effects"][q]
        if eff:
            out += "\n\nSwitches that turn the paradox on: " + "; ".join(
                f"{e['cell']}: {e['switch']} {e['off']} -> {e['on']} (was {e['verdict_when_off']})" for e in eff)
    if m["cells_skipped"]:
        out += "\n\nSkipped cells: " + "; ".join(f"{c['space']}/{c['teacher']}/{c['student']}/{c['solver']} "
                                                 f"({c['reason']})" for c in m["cells_skipped"])
    return out


# --- figures ------------------------------------------------------------------------------------------

def plot_samples(path: Path, cfg, samples: dict[str, torch.Tensor]) -> None:
    """Per space: the exact ODE, each teacher's chain, then every (student, method): the same x_T in every column."""
    solver = cfg.solvers[0]
    fig, axes = plotting.new_figure(1, len(cfg.spaces), size=(0.5 * cfg.eval.grid_images + 2.2, 0.55 * 12))
    for a, sp in enumerate(cfg.spaces):
        rows = [("exact ODE", samples.get(f"{sp}/exact_ode"))]
        for kind in cfg.teachers:
            rows.append((f"{kind} teacher ({solver})", samples.get(f"{sp}/{kind}/teacher/{solver}")))
            for student in cfg.students:
                for method in cfg.methods:
                    rows.append((f"{kind}/{student} {method}", samples.get(f"{sp}/{kind}/{student}/{solver}/{method}")))
        rows = [(n, x) for n, x in rows if x is not None]
        C, H, W = rows[0][1].shape[1:]
        n = cfg.eval.grid_images
        canvas = torch.ones(len(rows) * (H + 1), n * (W + 1), C)
        for i, (_, x) in enumerate(rows):
            for j in range(min(n, x.shape[0])):
                canvas[i * (H + 1):i * (H + 1) + H, j * (W + 1):j * (W + 1) + W] = ((x[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1)
        ax = axes[0, a]
        ax.imshow(canvas.squeeze(-1).numpy() if C == 1 else canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([i * (H + 1) + H / 2 for i in range(len(rows))])
        ax.set_yticklabels([r[0] for r in rows], fontsize=7)
        ax.set_xticks([])
        ax.set_title(f"{sp} space: one-step samples from shared x_T (seed {cfg.seeds[0]})", fontsize=8)
    plotting.save(fig, path)


def plot_budget(path: Path, cfg, curves: Sequence[dict], floor: dict) -> None:
    keys = ("E_solver", "E_exact_pixel", "fd_teacher", "fd_data")
    fig, axes = plotting.new_figure(len(cfg.spaces), len(keys), size=(3.1, 2.6))
    groups: dict[tuple, dict[int, list[float]]] = {}
    for c in curves:
        for k in keys:
            groups.setdefault((c["space"], c["teacher"], c["student"], c["solver"], c["method"], k), {}).setdefault(
                c["step"], []).append(c[k])
    for i, sp in enumerate(cfg.spaces):
        for j, k in enumerate(keys):
            ax = axes[i, j]
            for (s, teacher, student, solver, method, key), by_step in sorted(groups.items()):
                if s != sp or key != k:
                    continue
                steps = sorted(by_step)
                mu = [sum(by_step[t]) / len(by_step[t]) for t in steps]
                sd = [common.stat(by_step[t])["std"] for t in steps]
                ax.plot(steps, mu, linestyle=CELL_STYLES.get((teacher, student), "-"), color=METHOD_COLORS[method],
                        marker="o", ms=3, label=f"{teacher} teacher, {student} student, {method} ({solver})")
                ax.fill_between(steps, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                                color=METHOD_COLORS[method], alpha=0.12, lw=0)
            if k == "fd_data":
                ax.axhspan(floor["mean"] - floor["std"], floor["mean"] + floor["std"], color="0.6", alpha=0.35,
                           label="finite-sample floor (train subset vs held-out, ±1 sd)")
            ax.set_yscale("log")
            ax.set_xlabel("training steps (per member)", fontsize=7)
            ax.set_ylabel(LABELS[k], fontsize=7)
            ax.set_title(f"{sp} space", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=6.5, frameon=False)
    plotting.save(fig, path, rect=(0, 0.04 + 0.018 * math.ceil(len(labels) / 2), 1, 1))


def plot_shrinkage(path: Path, cfg, spectra: dict[str, torch.Tensor], cov: dict[str, torch.Tensor]) -> None:
    fig, axes = plotting.new_figure(len(cfg.spaces), 2, size=(4.2, 3.0))
    for i, sp in enumerate(cfg.spaces):
        for j, (data, name) in enumerate([(spectra, "mean 2D FFT power per radial frequency"),
                                          (cov, "pixel covariance eigenvalue")]):
            ax = axes[i, j]
            for label, v in data.items():
                if not (label.startswith(f"{sp}/") or label.startswith("data")):
                    continue
                parts = label.split("/")  # space/teacher/student/solver/method, space/teacher/"teacher"/solver, data
                if label.startswith("data"):
                    color, style = "k", "-"
                elif parts[2] == "teacher":
                    color, style = "0.5", "-" if parts[1] == "exact" else "--"
                else:
                    color, style = METHOD_COLORS.get(parts[-1], "c"), CELL_STYLES.get((parts[1], parts[2]), "-")
                x = range(len(v)) if j == 0 else range(1, len(v) + 1)
                ax.plot(list(x), v.tolist(), linestyle=style, color=color, lw=1.2, label=label.replace(f"{sp}/", ""))
            ax.set_yscale("log")
            if j == 1:
                ax.set_ylim(bottom=1e-6)  # digits have constant (zero-variance) border pixels
            ax.set_xlabel("radial frequency (cycles per image)" if j == 0 else "eigenvalue rank", fontsize=7)
            ax.set_ylabel(name, fontsize=7)
            ax.set_title(f"{sp} space samples (decoded), mean over seeds", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=5.5, frameon=False)
    plotting.save(fig, path)


def plot_score_error(path: Path, score_errors: dict[str, dict]) -> None:
    fig, axes = plotting.new_figure(1, 1, size=(4.0, 3.0))
    ax = axes[0, 0]
    for sp, se in score_errors.items():
        ax.plot(se["t"], se["per_t"], marker="o", ms=3, label=f"learned teacher, {sp} space (mean {common.fmt(se['mean'])})")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t (paper indexing; t = 0 clean)", fontsize=8)
    ax.set_ylabel("E ||eps_learned - eps_exact||^2 / d", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    plotting.save(fig, path)


def write_outputs(out: Path, cfg, metrics: dict[str, Any]) -> None:
    """metrics.json (without the plot arrays), table.md and the figures."""
    plot = metrics.get("_plot", {})
    common.write_json(out / "metrics.json", {k: v for k, v in metrics.items() if k != "_plot"})
    common.write_table(out, render_table(cfg, metrics), echo=False)
    if cfg.plots:
        plot_samples(out / "samples.png", cfg, plot["samples"])
        plot_budget(out / "metrics_vs_budget.png", cfg, metrics["curves"], metrics["floor_fd_data"])
        plot_shrinkage(out / "shrinkage.png", cfg, plot["spectra"], plot["covariance"])
        if metrics["score_error"]:
            plot_score_error(out / "teacher_score_error.png", metrics["score_error"])
