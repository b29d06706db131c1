"""Tables and entry point of the exact-teacher toy studies (``studies.cells``): markdown tables of regimes
and corrected verdicts, the budget / merged-rows / floor lines, writing a results folder, and the
``python -m studies.<name>`` plumbing shared by latent_space, inductive_bias and solver_ablation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import common, evidence, plotting

__all__ = ["markdown_table", "budget_line", "merged_note", "floor_line", "verdict_table", "write_outputs", "run_study"]


def markdown_table(regimes: list[dict], keys: Sequence[str], quick: bool, methods: Sequence[str] | None = None) -> str:
    """Rows = (regime, method); metric means ± std over seeds; a converged column (seeds converged / seeds)."""
    head = ["regime", "method", *keys, "converged"]
    rows = []
    for r in regimes:
        for m, vals in r["methods"].items():
            if methods and m not in methods:
                continue
            conv = r.get("converged", {}).get(m)
            rows.append([r["label"], plotting.method_name(m), *[common.fmt_stat(vals.get(k)) for k in keys],
                         f"{sum(conv)}/{len(conv)}" if conv else "-"])
    table = common.markdown_table(head, rows)
    return (f"**{plotting.SMOKE_LABEL}**\n\n" if quick else "") + table


def budget_line(metrics: Mapping) -> str:
    """The budget every finding states, and the convergence rule."""
    b = metrics["budget"]
    return evidence.budget_line(b, f"EMA rate {b['ema_rate']:g}, init {evidence.init_text(b, b['init'])}")


def merged_note(merged: Sequence[Mapping]) -> str:
    if not merged:
        return "No rows merged (every regime is a distinct computation)."
    parts = [f"{m['dropped']} into {m['kept']} ({m['reason']}; {m['match']}; largest difference "
             f"{common.fmt(m['max_abs_diff'])})" for m in merged]
    return "Merged rows (identical computations reported once): " + "; ".join(parts) + "."


def floor_line(floor: Mapping[str, Mapping] | None, keys: Sequence[str]) -> str:
    if not floor:
        return ""
    cells_ = [f"{k} {common.fmt(floor[k]['mean'])} ± {common.fmt(floor[k]['sd'], 2)}" for k in keys if k in floor]
    n = len(next(iter(floor.values()))["values"])
    return f"Finite-sample floor (two independent p_0 samples, mean ± sd over {n} draws): " + ", ".join(cells_) + "."


def verdict_table(v: Mapping) -> str:
    """The corrected verdicts: dE and dQ (paired means with their intervals at the corrected level)."""
    head = ["regime", "dE = E_cd - E_dcd [CI]", "dQ (> 0: CD better samples) [CI]", "level", "verdict"]
    rows = []
    for r in v.get("regimes", []):
        de, dq = r["dE"], r["dQ"]
        ci = lambda d: f"{common.fmt(d['mean'])} [{common.fmt(d['low'])}, {common.fmt(d['high'])}]"  # noqa: E731
        rows.append([r["label"] + (" [quick]" if r.get("quick") else ""), ci(de), ci(dq), f"{r['level']:.4f}",
                     r["verdict"]])
    return common.markdown_table(head, rows)


# ------------------------------------------------------------------------------------------------
# entry point (CLI and results folder from studies.common)
# ------------------------------------------------------------------------------------------------
def write_outputs(out_dir: str | Path, study: str, metrics: dict, table: Callable[[dict], str],
                  plot: Callable[[dict, Path], Any] | None) -> None:
    """``metrics.json``, ``table.md`` and the plots (PNG + PDF) into ``out_dir``."""
    out_dir = Path(out_dir)
    common.write_json(out_dir / "metrics.json", metrics)
    common.write_table(out_dir, table(metrics), echo=False)
    if plot is not None:
        plot(metrics, out_dir / f"{study}.png")


def run_study(study: str, model, quick: dict[str, Any], run: Callable, argv: list[str] | None,
              description: str) -> Path:
    """Parse the common flags, resolve the config, check the results folder, then
    ``run(cfg, out_dir=folder, progress=..., argv=argv)`` (which writes every file); return the folder."""
    args = common.parse_args(study, argv, description)
    cfg = common.resolve_config(model, args, quick)
    cfg = common.apply_run_flags(cfg, args)
    out = common.results_folder(study, args, quick=cfg.quick, create=not args.check)
    if common.report_check(args, f"studies.{study}", cfg):
        return None
    metrics = run(cfg, out_dir=out, argv=argv)
    print(f"{study}: {metrics.get('summary', '')} -> {out} ({metrics['timing']['total_seconds']:.0f} s)")
    return out
