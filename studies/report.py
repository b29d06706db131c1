"""Collect every study's latest results folder into one ``report.md`` and a self-contained ``report.html``.

``python -m studies.report [--results results] [--out DIR] [--include-quick] [--alpha 0.05] [--correction holm]``

The report only *reads* results folders (``studies.report_io``). A study folder holds ``metrics.json`` in the
regime schema::

    {"study": "inductive_bias", "quick": false, "budget": {"train_steps": 2000, ...},
     "quality": {"key": "w2_teacher", "label": "W2 to the teacher's samples"},     # lower is better
     "regimes": [{"label": "width=64 depth=3", "group": "capacity", "params": {...},
                  "switches": {"score_error": 0.0, "decoder": "identity"},       # which explanations are on
                  "methods": {"cd": {"E": {"mean", "std", "values": [per seed]}, "w2_teacher": {...}},
                              "direct_cd": {...}},
                  "converged": {"cd": true, "direct_cd": true}}],
     "verdicts": classify_regimes(...).to_dict(), "merged": [...], "floor": {...}}

Evidence rules (``/DESIGN.md``), as applied here (``studies.report_evidence``):

* a regime is a **paradox** only when Direct CD's lower E and CD's better samples both hold with paired
  intervals over seeds, corrected for the number of regimes counted (Holm over the regimes of one study by
  default); the study's own ``verdicts`` are used when present and consistent, otherwise they are recomputed
  with ``studies.stats.classify_regimes``. Nothing else is called a paradox;
* identical regimes (solvers declared equivalent in ``odecm.solvers``, a study's ``merged`` list, or every
  per-seed value agreeing to 1e-12) are shown and counted once, named with all their members;
* smoke (``--quick``) runs are left out of every finding unless ``--include-quick``, and are labelled
  "smoke run — not evidence" wherever they appear;
* every claim states its intervals, correction, training budget and convergence where the study records them.

Python API: ``build_report(results, out_dir, include_quick=False, alpha=0.05, correction="holm")``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Sequence

from odecm.cli import InputError, add_check_arg, report_check, run_main

from .common import fmt, fmt_stat, stat
from .report_evidence import EXPLANATIONS, Evidence, spearman
from .report_html import Block, markdown_tables, render
from .report_io import (
    METHOD_LABEL,
    METHODS,
    QUICK_LABEL,
    STUDIES,
    StudyResult,
    display_name,
    find_latest,
    find_runs,
    folder_is_quick,
    load_study,
    merge_regimes,
    result_files,
    score_error_regimes,
    sdxl_regimes,
    to_regimes,
)
from .report_verdicts import (
    CORRECTION_NAMES,
    Comparison,
    StudyVerdicts,
    compare_methods,
    converged_text,
    interval_text,
    regime_verdicts,
    secondary_verdicts,
    study_verdicts,
)
from .stats import CORRECTIONS

__all__ = [
    "stat",
    "spearman",
    "STUDIES",
    "QUICK_LABEL",
    "Comparison",
    "compare_methods",
    "regime_verdicts",
    "StudyResult",
    "StudyVerdicts",
    "Evidence",
    "find_latest",
    "find_runs",
    "load_study",
    "to_regimes",
    "score_error_regimes",
    "sdxl_regimes",
    "collect_studies",
    "build_report",
    "main",
]

#: columns of the per-study metrics table besides E and the quality keys
_EXTRA_COLUMNS = ("E_exact", "E_true_ode", "E_decoded", "final_loss")


def collect_studies(results: Path, include_quick: bool = False) -> dict[str, StudyResult]:
    """The results folder shown for every study found: the newest that is not a smoke run (newer smoke runs are
    recorded in ``skipped``), or the newest smoke run when there is no other or ``include_quick``."""
    studies: dict[str, StudyResult] = {}
    files = result_files(results)
    for name in STUDIES:
        runs = find_runs(results, name, files)
        if not runs:
            continue
        folder = runs[0] if include_quick else next((r for r in runs if not folder_is_quick(r)), runs[0])
        st = load_study(name, folder)
        st.skipped = [r for r in runs[: runs.index(folder)] if folder_is_quick(r)]
        studies[name] = st
    return studies


# --------------------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------------------
def _tag(quick: bool) -> str:
    return f" ({QUICK_LABEL})" if quick else ""


def _single(c: Comparison) -> str:
    return " (one seed: no interval)" if c.seeds < 2 else ""


def _regime_table(sv: StudyVerdicts) -> tuple[list[str], list[list[str]]]:
    q = sv.quality_key
    header = ["regime", "seeds", f"{sv.e_key} CD", f"{sv.e_key} Direct CD", f"d{sv.e_key} = CD - Direct CD",
              f"{q} CD", f"{q} Direct CD", f"d{q} (> 0: CD better)", "level", "verdict", "converged"]
    rows = []
    for c in sv.comparisons:
        rows.append([c.label + _tag(c.quick), str(c.seeds), fmt_stat(c.E_cd), fmt_stat(c.E_dcd),
                     interval_text(c.result.dE), fmt_stat(c.Q_cd), fmt_stat(c.Q_dcd), interval_text(c.result.dQ),
                     f"{100 * c.level:.4g}%", c.verdict() + _single(c) + _tag(c.quick), converged_text(c.converged)])
    return header, rows


def _metrics_table(st: StudyResult, kept: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Rows = (regime, method), merged regimes once; columns = E, the quality keys and a few more (mean ± std)."""
    if not kept:
        return None
    present = {k for r in kept for m in r.get("methods", {}).values() for k in m}
    alt = st.metrics.get("alt_quality_keys") or []
    p0 = (st.metrics.get("quality_p0") or {}).get("key")
    keys = [k for k in dict.fromkeys([st.e_key, st.quality_key, p0, *alt, *_EXTRA_COLUMNS]) if k and k in present]
    rows = []
    for r in kept:
        name = display_name(r) + _tag(st.quick)
        for m in METHODS:
            vals = r.get("methods", {}).get(m)
            if vals is not None:
                rows.append([name, METHOD_LABEL[m], *[fmt_stat(vals.get(k)) for k in keys]])
    return ["regime", "method", *keys], rows


def _floor_lines(floor: Any, prefix: str = "") -> list[str]:
    """``key: mean ± sd over n draws`` for a floor as a distribution, ``key: value (one draw)`` otherwise."""
    if not isinstance(floor, dict):
        return []
    out = []
    for k, v in floor.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and "mean" in v:
            n = len(v.get("values") or [])
            sd = v.get("sd", v.get("std"))
            out.append(f"{name}: {fmt(v['mean'])}" + (f" ± {fmt(sd, 2)} over {n} draws" if n > 1 and sd is not None
                                                      else " (one draw: no spread)"))
        elif isinstance(v, dict):
            out += _floor_lines(v, f"{name} ")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{name}: {fmt(v)} (one draw: no spread)")
    return out


def _merged_lines(merged: list[dict]) -> list[str]:
    out = []
    for m in merged:
        diff = m.get("max_rel_diff")
        extra = f"; largest relative difference {fmt(diff)}" if isinstance(diff, (int, float)) and not (
            isinstance(diff, float) and math.isnan(diff)) else ""
        out.append(f"{m['dropped']} merged into {m['kept']} ({m['reason']}{extra})")
    return out


def _teacher_note(sv: StudyVerdicts) -> str:
    text = f"{sv.quality_key} {sv.quality_label}".lower()
    if "teacher" in text:
        return ""
    return (f"The primary quality metric ({sv.quality_label or sv.quality_key}) is not marked as a distance to the "
            "teacher's samples, which is the comparison the evidence rules ask for.")


def _paradox_section(st: StudyResult, sv: StudyVerdicts, secondary: list[StudyVerdicts]) -> list[Block]:
    blocks: list[Block] = [("h3", f"{st.name}: {len(sv.paradoxes)}/{len(sv.comparisons)} regimes show the paradox")]
    if sv.quick:
        blocks.append(("quick", f"{QUICK_LABEL}: {st.folder} is a smoke run, shown because --include-quick was given."))
    src = ("the study's own verdicts" if sv.source == "study" else
           "verdicts recomputed here from the per-seed values" + (f" ({sv.note})" if sv.note else ""))
    blocks.append(("p", f"Quality: {sv.quality_label or sv.quality_key} (`{sv.quality_key}`). Intervals: paired t over "
                        f"seeds at each regime's corrected level; correction: {sv.correction_text()}; {src}. "
                        f"{sv.budget[0].upper() + sv.budget[1:]}. " + _teacher_note(sv)))
    blocks.append(("table", _regime_table(sv)))
    if sv.merged:
        blocks += [("p", "Merged (shown and counted once):"), ("ul", _merged_lines(sv.merged))]
    if sv.uncompared:
        blocks += [("p", "Regimes without a verdict:"), ("ul", sv.uncompared)]
    if secondary:
        lines = []
        for s in secondary:
            para = "; ".join(f"{c.label}{_tag(c.quick)}: {c.intervals()}" for c in s.paradoxes)
            lines.append(f"{s.e_key} vs {s.quality_key}: {len(s.paradoxes)}/{len(s.comparisons)} paradox "
                         f"({s.counts_text()}; {s.correction_text()})" + (f" — {para}" if para else ""))
        blocks += [("p", "Other quality metrics, and E against the exact PF-ODE (each its own corrected family; "
                         "distances to the data are the second question):"), ("ul", lines)]
    return blocks


def _study_section(st: StudyResult, kept: list[dict]) -> list[Block]:
    blocks: list[Block] = [("h3", f"{st.name}{_tag(st.quick)}"), ("p", f"Results folder: `{st.folder}`.")]
    if st.quick:
        blocks.append(("quick", f"{QUICK_LABEL}: every number below comes from a --quick run."))
    if st.skipped:
        blocks.append(("p", "Newer smoke runs passed over (" + QUICK_LABEL + "): "
                            + ", ".join(f"`{p}`" for p in st.skipped) + "."))
    table = _metrics_table(st, kept)
    if table:
        blocks += [("p", "Per-regime metrics, mean ± std over seeds:"), ("table", table)]
    else:
        for header, rows in markdown_tables(st.table_md):
            blocks.append(("table", (header, [[c + _tag(st.quick) if i == 0 else c for i, c in enumerate(r)]
                                              for r in rows])))
    for key in [k for k in st.metrics if k.startswith("floor")]:
        floor = _floor_lines(st.metrics[key])
        if floor:
            blocks += [("p", f"Finite-sample floor of the metrics (`{key}`: two independent exact sample sets):"),
                       ("ul", floor)]
    rc = st.metrics.get("rank_correlation")
    if isinstance(rc, dict) and rc:
        vals = ", ".join(f"{k} {fmt(v)}" for k, v in rc.items())
        blocks.append(("p", f"Spearman rank correlation of latent E with the decoded {st.quality_key} over every "
                            f"trained student, per decoder (descriptive: no interval, used in no finding): {vals}."))
    for png in st.pngs:
        blocks.append(("img", (png, f"{st.name}{_tag(st.quick)}")))
    return blocks


def _intro(results: Path, studies: dict[str, StudyResult], include_quick: bool, alpha: float, correction: str) -> str:
    missing = [s for s in STUDIES if s not in studies]
    return (f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the latest results folder of each study under "
            f"`{results}`. Studies found: {', '.join(studies) or 'none'}; missing: {', '.join(missing) or 'none'}. "
            f"For each regime, dE = E_CD - E_DirectCD (> 0: Direct CD solves the teacher's ODE more accurately) and "
            f"dQ = Q_DirectCD - Q_CD for the quality distance (> 0: CD has the better samples), paired over seeds. "
            f"A regime is called a paradox only when both paired t-intervals lie above 0 at the level its correction "
            f"assigns ({CORRECTION_NAMES[correction]} over the regimes of one study, family error {alpha:g}, so at "
            f"least {100 * (1 - alpha):g}% intervals); 'tie' means neither interval excludes 0, not that the methods "
            f"are equal; the other verdicts describe the same intervals and are not error-controlled. Identical "
            f"regimes are counted once. Smoke runs are "
            + (f"included and labelled '{QUICK_LABEL}'." if include_quick else
               f"left out of every finding ('{QUICK_LABEL}')."))


def build_report(results: Path, out_dir: Path, include_quick: bool = False, alpha: float = 0.05,
                 correction: str = "holm") -> tuple[Path, Path, dict[str, StudyResult]]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths and the studies read."""
    if correction not in CORRECTIONS:
        raise InputError(f"correction: {correction!r}; allowed: {list(CORRECTIONS)}")
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha: {alpha!r}; allowed: 0 < alpha < 1")
    results, out_dir = Path(results), Path(out_dir)
    studies = collect_studies(results, include_quick)
    verdicts: dict[str, StudyVerdicts] = {}
    kept: dict[str, list[dict]] = {}
    for name, st in studies.items():
        kept[name], _ = merge_regimes(st.metrics.get("regimes") or [], st.metrics.get("merged"))
        sv = study_verdicts(st, include_quick, alpha, correction)
        if sv is not None:
            verdicts[name] = sv
    counted = {n: sv for n, sv in verdicts.items() if sv.source != "none"}
    evidence = [fn(counted) for _, fn in EXPLANATIONS]

    blocks: list[Block] = [("h1", "odecm: why does CD beat Direct CD on samples?"),
                           ("p", _intro(results, studies, include_quick, alpha, correction)), ("toc", None),
                           ("h2", "Summary")]
    summary = []
    for name, st in studies.items():
        sv = verdicts.get(name)
        if st.quick and not include_quick:
            summary.append(f"{name}: {QUICK_LABEL} (`{st.folder}`): left out of every finding; "
                           "--include-quick shows it.")
        elif sv is None or not (sv.comparisons or sv.uncompared):
            summary.append(f"{name}: no CD / Direct CD comparison in these results.")
        else:
            summary.append(f"{'[' + QUICK_LABEL + '] ' if sv.quick else ''}{name}: {sv.count_sentence()}; verdicts: "
                           f"{sv.counts_text()}; {sv.correction_text()}; {sv.budget}.")
    for ev in evidence:
        summary.append(f"{ev.title}: {len(ev.supports)} line(s) of support, {len(ev.against)} against, "
                       f"{len(ev.open)} open (details below).")
    blocks.append(("ul", summary))

    blocks.append(("h2", "Where does the paradox appear?"))
    shown = [n for n, sv in counted.items() if sv.comparisons or sv.uncompared]
    for name in shown:
        blocks += _paradox_section(studies[name], counted[name],
                                   secondary_verdicts(studies[name], counted[name], include_quick, alpha, correction))
    if not shown:
        blocks.append(("p", "No study has CD / Direct CD comparisons that count as evidence yet."))

    blocks.append(("h2", "Evidence per explanation"))
    blocks.append(("p", "Derived only from the verdicts above: within one study, a factor's regimes are contrasted "
                        "with the study's regimes where the factor is off. Each line states its intervals, correction, "
                        "budget and convergence."))
    for ev in evidence:
        blocks += [("h3", ev.title), ("p", "Supports:"), ("ul", ev.supports), ("p", "Against:"), ("ul", ev.against),
                   ("p", "Open (the numbers settle neither way):"), ("ul", ev.open)]

    blocks.append(("h2", "Studies"))
    for name, st in studies.items():
        blocks += _study_section(st, kept[name])
    if not studies:
        blocks.append(("p", f"No results folders found under `{results}`."))

    md, page = render(blocks, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path, studies


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", help="root of the results folders")
    ap.add_argument("--out", default=None, help="output folder (default <results>/report)")
    ap.add_argument("--include-quick", action="store_true",
                    help=f"use smoke (--quick) runs in the findings, labelled '{QUICK_LABEL}'")
    ap.add_argument("--alpha", type=float, default=0.05, help="family error of the paradox claims per study")
    ap.add_argument("--correction", default="holm", choices=list(CORRECTIONS), help="multiple-comparison correction")
    add_check_arg(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    results = Path(args.results)
    if not results.is_dir():
        raise InputError(f"--results: {results} is not a folder")
    out = Path(args.out) if args.out else results / "report"
    if report_check(args, "studies.report", results=results, out=out):
        return 0
    md, page, studies = build_report(results, out, args.include_quick, args.alpha, args.correction)
    print(f"wrote {md} and {page} ({len(studies)} studies: {', '.join(studies) or 'none'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
