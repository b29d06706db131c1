"""studies.paradox_map, the report: regimes (one per cell) with corrected verdicts, the JSON check, table and heatmaps.

Sign convention (every panel, every JSON difference): positive = the paradox direction.

* ``dE = E_cd - E_direct``: > 0 when the compared student (Direct CD, or cd_k) solves the teacher's ODE
  better (paper eq. 6 against the teacher's solver chain); on a ``direct_first`` axis ``cd`` is the
  two-phase student (P Direct CD steps, then CD) and the compared student Direct CD of the same budget;
* ``dQ = W2_direct - W2_cd`` to the teacher's samples (``verdicts``) or to p_0 (``verdicts_p0``): > 0 when
  CD's one-step samples are the closer ones.

Heatmaps (``draw_map``): three panels dE, dQ(teacher), dQ(p_0); colour = the mean over seeds on a
diverging symmetric-log scale centred at 0 (red > 0); text = the mean, ``*`` when its interval at the
corrected level excludes 0, and the interval; ``//`` hatching = a paradox cell (``verdicts``), ``\\\\``
in the p_0 panel = paradox against p_0 (``verdicts_p0``); ``†`` = CD not converged on every seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import common, evidence, plotting
from .paradox_map_engine import CD, MapPlan, MapResults, method_name, world_label
from .stats import paired_difference

__all__ = ["build_metrics", "validate_metrics", "render_table", "draw_map", "plot", "write", "METRICS", "PANELS"]

METRICS = ("E_solver", "w2_teacher", "w2_p0")
AXIS_LABELS = {
    "score_error": "teacher {kind} {knob}\n(ε: its measured score error, eps MSE per coordinate)",
    "width": "student width (hidden units; depth {depth})",
    "depth": "student depth (hidden layers; width {width})",
    "dim": "data dimension d",
    "n_modes": "mixture modes K ('random' preset)",
    "k": "k: teacher steps in the target\n(1 = CD; all = N = {N} = Direct CD)",
    "direct_first": "P: Direct CD steps before CD\n(of {steps}; 0 = plain CD)",
    "train_steps": "training budget (optimizer steps,\nconstant lr after {warmup} warm-up)",
}
KNOB_NAMES = {"wrong_gmm": "δ", "nonconservative": "δ", "learned": "DSM budget"}
#: what a knob means (JSON, table and the figure's footnote)
KNOB_DEFINITIONS = {
    "wrong_gmm": "wrong_gmm δ: the exact denoiser of q_δ (means moved by δ x mode spacing, widths x (1 + δ))",
    "nonconservative": "nonconservative δ: exact eps plus a rotational (curl) field of size δ in eps units",
    "learned": "learned budget: a DSM-trained MLP teacher after that many Adam steps",
    "exact": "exact: the Bayes-optimal denoiser of p_0 (no score error)",
}
#: panel -> (verdict block, difference, colorbar label)
PANELS = (
    ("verdicts", "dE", "dE = E_{base} − E_{cmp} (data units²)\n> 0 (red): {cmp} lower E"),
    ("verdicts", "dQ", "dW2 to the teacher's samples = W2_{cmp} − W2_{base} (data units)\n> 0 (red): {base} closer"),
    ("verdicts_p0", "dQ", "dW2 to p_0 = W2_{cmp} − W2_{base} (data units)\n> 0 (red): {base} closer"),
)
PANEL_TITLES = ("ODE error E (eq. 6, vs the teacher's solver)", "distance to the teacher's samples",
                "distance to p_0 (second question)")


def _axis_block(cfg, axis, W, plan: MapPlan) -> dict:
    t = cfg.teacher
    text = AXIS_LABELS[axis.name].format(kind=t.kind, knob=KNOB_NAMES.get(t.kind, ""), depth=cfg.network.depth,
                                         width=cfg.network.width, N=plan.grid.numel() - 1,
                                         warmup=cfg.train.warmup_steps, steps=cfg.train.train_steps)
    ticks = [str(v) for v in axis.values]
    if axis.name == "score_error":
        ticks = []
        for v in axis.values:
            se = [np.mean(W.score_errors(c.world)) for c in plan.cells if c.params[axis.name] == v and W.score_errors(c.world)]
            ticks.append(f"{v:g}\nε={common.fmt(se[0], 2)}" if se else f"{v:g}")
    return {"name": axis.name, "label": text, "values": list(axis.values), "ticks": ticks,
            "definition": KNOB_DEFINITIONS.get(t.kind, "") if axis.name == "score_error" else text.replace("\n", " ")}


def _paired(a, b) -> dict:
    d = paired_difference(a, b)
    return {"mean": d.mean, "low": d.low, "high": d.high, "level": d.level, "p_value": d.p_value}


def _switch_block(cell, keys: dict, per: dict, res: MapResults, seeds: list) -> dict:
    """A two-phase cell: E at the switch step P (the two-phase student after its Direct CD phase, and Direct CD
    at P: the same student), what CD then did to it (``change``: E at the budget minus E at P, paired by seed)
    and, where the map trains plain CD of that shape, the two-phase student minus plain CD (``vs_cd``);
    uncorrected 95% paired t-intervals over seeds."""
    P = cell.base[1]
    at_p = {m: res.at(key, P, cell.world, seeds, "E_solver") for m, key in keys.items()}
    out = {"step": P, **{m: common.stat(v) for m, v in at_p.items()},
           "change": {"E_solver": _paired(per["cd"]["E_solver"], at_p["cd"])}}
    cd_key = (cell.shape, CD)
    if cd_key in res.values and cell.budget in res.values[cd_key]:
        out["vs_cd"] = {k: _paired(per["cd"][k], res.at(cd_key, cell.budget, cell.world, seeds, k))
                        for k in ("E_solver", "w2_teacher")}
    return out


def build_metrics(cfg, plan: MapPlan, res: MapResults, floors: Mapping[str, dict]) -> dict:
    """The metrics dict: ``studies.evidence`` schema (one regime per cell, row-major) plus the ``map`` block."""
    W, seeds = res.worlds, list(cfg.seeds)
    N = plan.grid.numel() - 1
    regimes, reference = [], []
    for cell in plan.cells:
        keys = {"cd": (cell.shape, cell.base), "direct_cd": (cell.shape, cell.method)}
        per = {m: {k: res.at(key, cell.budget, cell.world, seeds, k) for k in METRICS} for m, key in keys.items()}
        conv = {}
        if cell.budget // 2 in res.values[keys["cd"]] and cell.budget >= 2:
            for m, key in keys.items():
                conv[m] = evidence.converged_flags(per[m]["E_solver"], res.at(key, cell.budget // 2, cell.world, seeds,
                                                                               "E_solver"))
        se = W.score_errors(cell.world)
        se_mean = float(np.mean(se)) if se else 0.0
        compared = method_name(cell.method)
        resolved = {"teacher": cfg.teacher.kind, "knob": cell.knob, "score_error": se_mean, "score_error_values": se,
                    "dim": cell.dim, "n_modes": cell.n_modes, "width": cell.width, "depth": cell.depth, "k": cell.k,
                    "train_steps": cell.budget, "compared": compared, "base": method_name(cell.base),
                    "direct_first": cell.base[1] or 0, "world": world_label(cell.world, cfg.teacher.kind)}
        if cell.base != CD:
            resolved["switch"] = _switch_block(cell, keys, per, res, seeds)
        reg = evidence.regime_entry(cell.label, f"{cfg.rows.name}={cell.params[cfg.rows.name]}", cell.params, per,
                                    switches={"score_error": se_mean, "decoder": "identity"}, converged=conv or None,
                                    cell=resolved, position=[cell.row, cell.col], reference=cell.reference)
        regimes.append(evidence.add_differences(reg))
        if cell.reference:
            reference.append(cell.label)
    counted = [r for r in regimes if not r["reference"]]
    st = cfg.stats
    v = evidence.verdicts(counted, "w2_teacher", e_key="E_solver", quick=cfg.quick, method=st.correction, alpha=st.alpha)
    v_p0 = evidence.verdicts(counted, "w2_p0", e_key="E_solver", quick=cfg.quick, method=st.correction, alpha=st.alpha)
    cmp = "Direct CD" if all(c.method == ("direct_cd", None) or c.reference for c in plan.cells) else "the cd_k student"
    two_phase = any(c.base != CD for c in plan.cells)
    cd_text = "CD (k = 1): one teacher step, then the online student under stop-gradient (eq. 4)"
    if two_phase:
        cd_text = ("per cell (regime 'cell.base'): the two-phase student, P = direct_first steps of Direct CD (eq. 5), "
                   "then CD (eq. 4) with the same optimizer and learning rate up to the budget; P = 0 is plain CD")
    first = next(iter(floors.values()), {})
    metrics = {
        "study": "paradox_map", "quick": cfg.quick,
        "budget": evidence.budget_block(cfg.train.model_copy(update={"train_steps": max(c.budget for c in plan.cells)}),
                                        0, N, budgets=sorted({c.budget for c in plan.cells}), solver=cfg.world.solver),
        "quality": {"key": "w2_teacher", "label": "W2 to the teacher's exact-ODE samples", "higher_is_better": False},
        "quality_p0": {"key": "w2_p0", "label": "W2 to p_0"},
        "regimes": regimes, "merged": [], "verdicts": v, "verdicts_p0": v_p0,
        "floor": {k: first[k] for k in ("w2_teacher", "w2_p0") if k in first}, "floors": dict(floors),
        "map": {
            "title": cfg.title, "rows": _axis_block(cfg, cfg.rows, W, plan), "cols": _axis_block(cfg, cfg.cols, W, plan),
            "comparison": {
                "cd": cd_text, "base": "DCD→CD" if two_phase else "CD",
                "direct_cd": ("per cell (regime 'cell.compared'): Direct CD (eq. 5: the teacher solver to t_0) where "
                              "k = all or k >= N, else the cd_k student (min(k, n) teacher steps, then the target "
                              "network); a k = 1 cell compares CD with itself (a reference cell: not counted)"),
                "compared": cmp, "reference_cells": reference},
            "sign": {"dE": "E_cd - E_direct: > 0 = the compared student has the lower E",
                     "dQ": "W2_direct - W2_cd: > 0 = CD's samples are closer"
                           + (" (cd = the two-phase student DCD→CD)" if two_phase else "")},
            "teacher": {**cfg.teacher.model_dump(), "definition": KNOB_DEFINITIONS[cfg.teacher.kind]},
            "worlds": [{"label": world_label(w, cfg.teacher.kind), "score_error": W.score_errors(w)} for w in plan.worlds],
            "held_fixed": {"seeding.hold_fixed": list(cfg.seeding.hold_fixed),
                           "under_study": [f"the data mixture (preset {cfg.data.preset!r}, data.seed {cfg.data.seed})",
                                           f"the teacher family and knob ({cfg.teacher.kind}; wrong_gmm directions "
                                           f"from teacher.seed {cfg.teacher.seed})", "the world config (schedule, grid, "
                                           f"solver {cfg.world.solver})"],
                           "varied": cfg.seeding.varied()},
        },
        "seeding": cfg.seeding.model_dump(),
        "summary": evidence.summary_line(v, cfg.quick, "W2 to the teacher's samples")
                   + f" Against p_0: {sum(r['verdict'] == 'paradox' for r in v_p0['regimes'])}/{len(v_p0['regimes'])}.",
    }
    return metrics


def validate_metrics(metrics: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every way ``metrics`` departs from the schema (module docstring)."""
    probs: list[str] = []
    for k in ("study", "quick", "budget", "quality", "quality_p0", "regimes", "verdicts", "verdicts_p0", "floor",
              "map", "summary"):
        if k not in metrics:
            probs.append(f"missing key {k!r}")
    if probs:
        raise ValueError("; ".join(probs))
    if metrics["study"] != "paradox_map" or not isinstance(metrics["quick"], bool):
        probs.append("study must be 'paradox_map' and quick a bool")
    for k in ("train_steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "convergence_rule"):
        if k not in metrics["budget"]:
            probs.append(f"budget.{k} missing")
    if set(metrics["quality"]) < {"key", "label"}:
        probs.append("quality needs key and label")
    mp = metrics["map"]
    R, C = len(mp["rows"]["values"]), len(mp["cols"]["values"])
    regs = metrics["regimes"]
    if len(regs) != R * C:
        probs.append(f"{len(regs)} regimes for a {R} x {C} map")
    for r in regs:
        for k in ("label", "group", "params", "methods", "reference", "cell", "position"):
            if k not in r:
                probs.append(f"regime {r.get('label')!r}: missing {k!r}")
        if set(r.get("params", {})) != {mp["rows"]["name"], mp["cols"]["name"]}:
            probs.append(f"regime {r.get('label')!r}: params must hold the row and col values")
        n = None
        for m in evidence.METHODS:
            for key in METRICS:
                s = r.get("methods", {}).get(m, {}).get(key)
                if not s or set(s) < {"mean", "std", "values"}:
                    probs.append(f"regime {r.get('label')!r}: methods.{m}.{key} missing mean/std/values")
                    continue
                n = len(s["values"]) if n is None else n
                if len(s["values"]) != n:
                    probs.append(f"regime {r.get('label')!r}: {m}.{key} has {len(s['values'])} seeds, expected {n}")
    labels = {r["label"] for r in regs if not r.get("reference")}
    for block in ("verdicts", "verdicts_p0"):
        v = metrics[block]
        got = {x["label"] for x in v.get("regimes", [])}
        if got != labels:
            probs.append(f"{block}: cells {sorted(got ^ labels)} missing or extra")
        if v.get("correction", {}).get("num_comparisons") != len(labels):
            probs.append(f"{block}: correction must count the {len(labels)} non-reference cells")
    if probs:
        raise ValueError("metrics.json does not match the paradox_map schema: " + "; ".join(probs))


def _grid(metrics: Mapping, block: str, diff: str) -> dict[str, np.ndarray]:
    """(R, C) arrays of the panel: mean, low, high, significant, paradox; reference cells are flagged."""
    R, C = len(metrics["map"]["rows"]["values"]), len(metrics["map"]["cols"]["values"])
    out = {k: np.full((R, C), np.nan) for k in ("mean", "low", "high")}
    out.update({k: np.zeros((R, C), bool) for k in ("significant", "paradox", "reference", "not_converged")})
    verdicts = {v["label"]: v for v in metrics[block].get("regimes", [])}
    for r in metrics["regimes"]:
        i, j = r["position"]
        conv = (r.get("converged") or {}).get("cd")
        out["not_converged"][i, j] = bool(conv) and not all(conv)
        if r.get("reference"):
            out["reference"][i, j] = True
            continue
        v = verdicts.get(r["label"])
        if v is None:
            continue
        d = v[diff]
        out["mean"][i, j], out["low"][i, j], out["high"][i, j] = d["mean"], d["low"], d["high"]
        out["significant"][i, j] = d["direction"] != 0
        out["paradox"][i, j] = v["verdict"] == "paradox"
    return out


def _g(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.2g}"


def draw_map(metrics: Mapping):
    """The three-panel heatmap figure (see the module docstring); paradox hatches carry ``gid``
    ``"paradox:i,j"`` (and ``"paradox_p0:i,j"``) so tests can find them."""
    import textwrap

    import matplotlib
    from matplotlib.colors import SymLogNorm
    from matplotlib.patches import Rectangle

    mp = metrics["map"]
    rows, cols = mp["rows"], mp["cols"]
    R, C = len(rows["values"]), len(cols["values"])
    cmp = "Direct CD" if mp["comparison"]["compared"] == "Direct CD" else "cd_k"
    base = mp["comparison"].get("base", "CD")
    fig, axes = plotting.new_figure(1, 3, size=(0.68 * C + 1.9, 0.55 * R + 2.0))  # size per panel
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    for p, ((block, diff, cbar), title) in enumerate(zip(PANELS, PANEL_TITLES)):
        ax, g = axes[0, p], _grid(metrics, block, diff)
        finite = np.abs(g["mean"][np.isfinite(g["mean"])])
        M = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        norm = SymLogNorm(linthresh=M / 100, vmin=-M, vmax=M, base=10)
        shown = np.where(g["reference"], np.nan, g["mean"])
        im = ax.imshow(shown, cmap=cmap, norm=norm, origin="lower", aspect="auto")
        for i in range(R):
            for j in range(C):
                if g["reference"][i, j]:
                    ax.text(j, i, "= CD\n(reference)", ha="center", va="center", fontsize=6, color="0.3")
                    continue
                m = g["mean"][i, j]
                dark = np.isfinite(m) and abs(norm(m) - 0.5) > 0.33
                mark = "*" if g["significant"][i, j] else ""
                dag = "†" if (p == 0 and g["not_converged"][i, j]) else ""
                ax.text(j, i + 0.12, f"{_g(m)}{mark}{dag}", ha="center", va="center", fontsize=7,
                        color="w" if dark else "k", fontweight="bold" if mark else "normal")
                ax.text(j, i - 0.2, f"[{_g(g['low'][i, j])}, {_g(g['high'][i, j])}]", ha="center", va="center",
                        fontsize=5, color="w" if dark else "k")
                if g["paradox"][i, j]:
                    hatch = "\\\\\\" if block == "verdicts_p0" else "///"
                    gid = ("paradox_p0" if block == "verdicts_p0" else "paradox") + f":{i},{j}"
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch=hatch, lw=0.0, ec="k",
                                           gid=gid, alpha=0.6))
        if block == "verdicts_p0":  # the primary paradox cells also outlined here, for comparison
            prim = _grid(metrics, "verdicts", "dQ")["paradox"]
            for i, j in zip(*np.nonzero(prim)):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2, ec="k", gid=f"paradox:{i},{j}"))
        ax.set_xticks(range(C), cols["ticks"], fontsize=6)
        ax.set_yticks(range(R), rows["ticks"], fontsize=6)
        ax.set_xlabel(cols["label"], fontsize=7)
        ax.set_ylabel(rows["label"], fontsize=7)
        ax.set_title(title, fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label(cbar.format(cmp=cmp, base=base) + " (symlog scale)", fontsize=6)
        cb.ax.tick_params(labelsize=5)
    v = metrics["verdicts"]
    corr = v.get("correction", {})
    n_seeds = len(metrics["regimes"][0]["methods"]["cd"]["E_solver"]["values"]) if metrics["regimes"] else 0
    suptitle = textwrap.fill(plotting.title(
        f"{mp['title']}: {base} vs {cmp}, mean over {n_seeds} seeds [interval at the {corr.get('method')}-corrected level, "
        f"m = {corr.get('num_comparisons')} cells]", metrics["quick"]), int(fig.get_figwidth() * 72 / 5.2))
    fig.suptitle(suptitle, fontsize=9)  # ~5.2 pt per character at fontsize 9; narrow maps get two lines
    note = (mp["teacher"]["definition"] + (". DCD→CD = P Direct CD steps, then CD (same optimizer, same total budget as "
                                           "Direct CD)" if base != "CD" else "")
            + f". /// = paradox ({cmp} lower E and {base} closer to the teacher's samples, "
            "both intervals > 0); \\\\\\ = the same against p_0 (separately corrected; primary paradox cells "
            f"outlined); * = interval excludes 0; † = {base} not converged on every seed (E moved > 5% since half the "
            "budget). Budget: " + ", ".join(str(b) for b in metrics["budget"].get("budgets", [])) + " steps.")
    width_chars = int(fig.get_figwidth() * 72 / 3.6)  # ~3.6 pt per character at fontsize 6
    fig.text(0.5, 0.01, textwrap.fill(note, width_chars), ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94 - 0.03 * suptitle.count("\n")))
    return fig


def plot(metrics: Mapping, path, dpi: int = 110, pdf: bool = True) -> list[Path]:
    """``draw_map`` saved as ``<path>.png`` (and ``.pdf``)."""
    import matplotlib.pyplot as plt

    fig = draw_map(metrics)
    stem = Path(path).with_suffix("")
    out = [stem.with_suffix(".png")] + ([stem.with_suffix(".pdf")] if pdf else [])
    fig.savefig(out[0], dpi=dpi)
    if pdf:
        fig.savefig(out[1])
    plt.close(fig)
    return out


def _ci(d: Mapping | None) -> str:
    return "-" if not d else f"{common.fmt(d['mean'])} [{common.fmt(d['low'])}, {common.fmt(d['high'])}]"


def render_table(metrics: Mapping) -> str:
    """``table.md``: summary, budget, per-cell table with corrected intervals, floors."""
    mp, fs = metrics["map"], common.fmt_stat
    v = {r["label"]: r for r in metrics["verdicts"]["regimes"]}
    v0 = {r["label"]: r for r in metrics["verdicts_p0"]["regimes"]}
    head = ["cell", "compared", "score err", "E CD", "E cmp", "dE [CI]", "W2→teacher CD", "W2→teacher cmp",
            "dQ teacher [CI]", "dQ p_0 [CI]", "CD conv.", "verdict", "verdict p_0"]
    rows = []
    for r in metrics["regimes"]:
        cd, dc = r["methods"]["cd"], r["methods"]["direct_cd"]
        conv = (r.get("converged") or {}).get("cd")
        a, b = v.get(r["label"]), v0.get(r["label"])
        base = r["cell"].get("base", "cd")
        rows.append([r["label"], r["cell"]["compared"] + ("" if base == "cd" else f" vs {base}"), common.fmt(r["cell"]["score_error"]), fs(cd["E_solver"]),
                     fs(dc["E_solver"]), _ci(a and a["dE"]), fs(cd["w2_teacher"]), fs(dc["w2_teacher"]),
                     _ci(a and a["dQ"]), _ci(b and b["dQ"]), f"{sum(conv)}/{len(conv)}" if conv else "-",
                     a["verdict"] if a else "reference (= CD)", b["verdict"] if b else "-"])
    corr = metrics["verdicts"]["correction"]
    lines = [f"# paradox_map: {mp['title']}", "", ("**" + plotting.SMOKE_LABEL + "**\n") if metrics["quick"] else "",
             metrics["summary"], "",
             f"Rows: {mp['rows']['definition']}; columns: {mp['cols']['definition']}. Teacher: "
             f"{mp['teacher']['definition']}.", "",
             f"Comparison: cd = {mp['comparison']['cd']}; direct_cd = {mp['comparison']['direct_cd']}.", "",
             f"Signs: dE = {mp['sign']['dE']}; dQ = {mp['sign']['dQ']}. Intervals: paired t over seeds at the "
             f"{corr['method']}-corrected level (m = {corr['num_comparisons']} cells, alpha {corr['alpha']}).", "",
             cells_budget_line(metrics), "", common.markdown_table(head, rows), ""]
    switch = [r for r in metrics["regimes"] if r["cell"].get("switch")]
    if switch:
        lines += ["Two-phase students: E at the switch (step P, after the Direct CD phase; = Direct CD's at P), mean ± "
                  "std over seeds; what the CD phase changed (E at the budget - E at P) and the two-phase student "
                  "minus plain CD of the same seed, uncorrected 95% paired t-intervals:", ""]
        for r in switch:
            sw = r["cell"]["switch"]
            vs = sw.get("vs_cd", {})
            lines.append(f"- {r['label']}: E at step {sw['step']} {fs(sw['cd'])}; change {_ci(sw['change']['E_solver'])}"
                         + (f"; vs plain CD: E {_ci(vs['E_solver'])}, W2→teacher {_ci(vs['w2_teacher'])}" if vs else ""))
        lines.append("")
    if metrics.get("floors"):
        lines += ["Finite-sample W2 floors (two independent samples of the same size; mean ± sd over draws):", ""]
        for w, f in metrics["floors"].items():
            approx = " (teacher floor approximated by p_0's)" if f.get("teacher_floor_approximate") else ""
            lines.append(f"- {w}: to p_0 {common.fmt(f['w2_p0']['mean'])} ± {common.fmt(f['w2_p0']['sd'], 2)}, "
                         f"to the teacher {common.fmt(f['w2_teacher']['mean'])} ± {common.fmt(f['w2_teacher']['sd'], 2)}"
                         + approx)
    hf = mp["held_fixed"]
    lines += ["", f"Seeds vary: {', '.join(hf['varied'])}; held fixed by seeding: {hf['seeding.hold_fixed'] or 'none'}; "
              f"fixed as the object under study: {'; '.join(hf['under_study'])}."]
    return "\n".join(lines)


def cells_budget_line(metrics: Mapping) -> str:
    b = metrics["budget"]
    return evidence.budget_line(b, f"target EMA rate {b['ema_rate']:g}, grid N = {b['grid_size']}, solver "
                                   f"{b['solver']}, student from scratch", steps=", ".join(map(str, b["budgets"])))


def write(out: Path, metrics: dict, plots: bool = True) -> None:
    """``metrics.json`` (validated first), ``table.md`` and ``paradox_map.png`` / ``.pdf``."""
    validate_metrics(metrics)
    common.write_json(Path(out) / "metrics.json", metrics)
    common.write_table(out, render_table(metrics), echo=False)
    if plots:
        plot(metrics, Path(out) / "paradox_map.png")
