"""Collect every study's latest results folder into one ``report.md`` and a static ``report.html``.

``python -m studies.report [--results results] [--out DIR]``

The report only *reads* results folders. A study folder holds ``metrics.json``; the studies of this
package write it in the **regime schema** below, which is what the verdicts are derived from::

    {"study": "inductive_bias",
     "quality": {"key": "w2", "label": "W2 to data", "floor": 0.02},   # lower is better
     "regimes": [
        {"label": "width=64 depth=3", "group": "capacity",
         "params": {"width": 64, "depth": 3},
         "switches": {"score_error": 0.0, "decoder": "identity"},    # which explanations are on
         "methods": {"cd":        {"E": {"mean": .., "std": .., "values": [..]}, "w2": {...}},
                     "direct_cd": {"E": {...}, "w2": {...}}}}]}

A regime shows **the paradox** when CD has the better samples (lower quality metric) while Direct CD
has the lower ODE error E. Differences are called *clear* when they exceed twice their standard
error over seeds (paired over seeds when both methods ran the same seeds), otherwise *within seed
spread*. Every statement in the report is computed from these numbers; nothing is hard-coded.

Folders in another format (e.g. a study written by someone else) are shown with their ``table.md``
and plots, and converted to regimes where ``to_regimes`` recognises them.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import fmt, fmt_stat, stat

STUDIES = ["score_error", "latent_space", "inductive_bias", "solver_ablation", "sdxl_table"]
METHODS = ("cd", "direct_cd")
METHOD_LABEL = {"cd": "CD", "direct_cd": "Direct CD"}

__all__ = [
    "stat",
    "Comparison",
    "compare_methods",
    "regime_verdicts",
    "find_latest",
    "load_study",
    "build_report",
    "main",
]


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------
def _diff_se(a: dict, b: dict) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and its standard error (paired when both have the same seed count)."""
    va, vb = a.get("values") or [a["mean"]], b.get("values") or [b["mean"]]
    d = a["mean"] - b["mean"]
    if len(va) == len(vb) and len(va) > 1:
        diffs = [x - y for x, y in zip(va, vb)]
        return d, stat(diffs)["std"] / math.sqrt(len(diffs))
    se2 = 0.0
    for v, s in ((va, a), (vb, b)):
        if len(v) > 1:
            se2 += s["std"] ** 2 / len(v)
    return d, math.sqrt(se2)


@dataclass
class Comparison:
    """CD vs Direct CD in one regime. ``dE = E_cd - E_dcd`` (> 0: Direct CD solves the ODE better),
    ``dQ = Q_dcd - Q_cd`` (> 0: CD has better samples); each with its standard error."""

    label: str
    dE: float
    se_E: float
    dQ: float
    se_Q: float
    E_cd: dict
    E_dcd: dict
    Q_cd: dict
    Q_dcd: dict
    quality_key: str
    seeds: int
    params: dict = field(default_factory=dict)
    switches: dict = field(default_factory=dict)
    group: str = ""

    @property
    def paradox(self) -> bool:
        return self.dE > 0 and self.dQ > 0

    @property
    def clear_E(self) -> bool:
        return abs(self.dE) > 2 * self.se_E

    @property
    def clear_Q(self) -> bool:
        return abs(self.dQ) > 2 * self.se_Q

    @property
    def clear(self) -> bool:
        return self.clear_E and self.clear_Q

    def verdict(self) -> str:
        """One of: paradox (clear / within seed spread), or which method wins on what."""
        if self.paradox:
            return "paradox" + ("" if self.clear else " (within seed spread)")
        if self.dE <= 0 and self.dQ > 0:
            return "no paradox: CD better on both"
        if self.dE > 0 and self.dQ <= 0:
            return "no paradox: Direct CD better on both"
        return "no paradox: CD lower E, Direct CD better samples"

    def sentence(self) -> str:
        q = self.quality_key
        return (f"{self.label}: E {fmt_stat(self.E_cd)} (CD) vs {fmt_stat(self.E_dcd)} (Direct CD), "
                f"{q} {fmt_stat(self.Q_cd)} vs {fmt_stat(self.Q_dcd)} -> {self.verdict()}")


def compare_methods(regime: dict, quality_key: str, e_key: str = "E") -> Comparison | None:
    """Comparison of the two methods of a regime, or None where one of them is missing."""
    m = regime.get("methods", {})
    if not all(k in m and e_key in m[k] and quality_key in m[k] for k in METHODS):
        return None
    cd, dcd = m["cd"], m["direct_cd"]
    dE, seE = _diff_se(cd[e_key], dcd[e_key])
    dQ, seQ = _diff_se(dcd[quality_key], cd[quality_key])
    return Comparison(
        label=regime.get("label", ""), dE=dE, se_E=seE, dQ=dQ, se_Q=seQ, E_cd=cd[e_key], E_dcd=dcd[e_key],
        Q_cd=cd[quality_key], Q_dcd=dcd[quality_key], quality_key=quality_key,
        seeds=len(cd[e_key].get("values", [])) or 1, params=regime.get("params", {}),
        switches=regime.get("switches", {}), group=regime.get("group", ""))


def regime_verdicts(study: dict, quality_key: str | None = None, e_key: str = "E") -> list[Comparison]:
    """Comparisons for every regime of a study in the regime schema."""
    q = quality_key or study.get("quality", {}).get("key")
    out = []
    for r in study.get("regimes", []):
        c = compare_methods(r, q, e_key)
        if c is not None:
            out.append(c)
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    if len(x) < 3 or len(x) != len(y):
        return float("nan")

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# results folders
# --------------------------------------------------------------------------------------------
def find_latest(results: Path, study: str) -> Path | None:
    """Newest results folder of ``study`` under ``results``.

    Folders under ``results/<study>/`` holding ``metrics.json`` (or ``table.json``) come first; only
    when there are none, any folder whose ``metrics.json`` says ``"study": <study>`` (so variants kept
    elsewhere, e.g. ``results/extra/...``, never shadow the main run). Newest = latest modification
    time of that file."""
    results = Path(results)
    if not results.exists():
        return None
    files = list(results.rglob("metrics.json")) + [p for p in results.rglob("table.json")
                                                     if not (p.parent / "metrics.json").exists()]
    owned, tagged = [], []
    for mfile in files:
        rel = mfile.parent.relative_to(results).parts
        if rel and rel[0] == study:
            owned.append(mfile)
        elif mfile.name == "metrics.json":
            try:
                if json.loads(mfile.read_text()).get("study") == study:
                    tagged.append(mfile)
            except (json.JSONDecodeError, OSError, AttributeError):
                continue
    pool = owned or tagged
    return max(pool, key=lambda f: f.stat().st_mtime).parent if pool else None


def score_error_regimes(metrics: dict) -> dict:
    """``studies.score_error`` (flat per-seed ``runs``) -> regime schema: one regime per (teacher,
    solver); ``E`` = ``E_solver`` (eq. 6), ``E_exact`` = ``E_true_ode``, quality = ``w2_p0``. The
    score-error switch is the teacher's measured score error (0 for the exact teacher)."""
    teachers = metrics.get("teachers", {})
    groups: dict[tuple, dict] = {}
    for row in metrics.get("runs", []):
        if row.get("method") not in METHODS:
            continue
        key = (row["teacher"], row.get("solver"))
        info = teachers.get(row["teacher"], {})
        level = 0.0 if info.get("kind") == "exact" else float(row.get("score_error", 0.0))
        g = groups.setdefault(key, {"label": f"{row['teacher']} {row.get('solver')}", "group": "score_error",
                                    "params": {"teacher": row["teacher"], "solver": row.get("solver"),
                                               "score_error": level},
                                    "switches": {"score_error": level, "decoder": "identity"}, "methods": {}})
        m = g["methods"].setdefault(row["method"], {})
        for src, dst in (("E_solver", "E"), ("E_true_ode", "E_exact"), ("E_teacher_ode", "E_teacher_ode"),
                         ("w2_p0", "w2_p0"), ("mmd2_p0", "mmd2_p0"), ("w2_teacher", "w2_teacher")):
            if isinstance(row.get(src), (int, float)):
                m.setdefault(dst, []).append(float(row[src]))
    for g in groups.values():
        for m in g["methods"].values():
            for k in list(m):
                m[k] = stat(m[k])
    out = dict(metrics)
    out["regimes"] = list(groups.values())
    out["quality"] = {"key": "w2_p0", "label": "W2 of one-step samples to p_0"}
    out["alt_quality_keys"] = ["mmd2_p0"]
    out["summary"] = ""
    return out


def sdxl_regimes(table: dict) -> dict:
    """``studies.sdxl_table`` ``table.json`` -> regime schema: one regime per (solver, k steps);
    ``E`` = latent ODE error, quality = FID against the teacher's samples (single runs, no seeds)."""
    groups: dict[tuple, dict] = {}
    for row in table.get("rows", []):
        if row.get("method") not in METHODS or row.get("status", "ok") != "ok":
            continue
        for k, vals in (row.get("k") or {}).items():
            if vals.get("ode_error_latent") is None or vals.get("fid_teacher") is None:
                continue
            g = groups.setdefault((row.get("solver"), k), {
                "label": f"SDXL {row.get('solver')} k={k}", "group": "sdxl",
                "params": {"solver": row.get("solver"), "k": k},
                "switches": {"score_error": "sdxl", "decoder": "vae"}, "methods": {}})
            g["methods"][row["method"]] = {"E": stat([vals["ode_error_latent"]]), "fid": stat([vals["fid_teacher"]]),
                                           **({"fd_dino": stat([vals["fd_dino_teacher"]])}
                                              if vals.get("fd_dino_teacher") is not None else {})}
    return {"study": "sdxl_table", "quality": {"key": "fid", "label": "FID against the teacher's samples"},
            "regimes": list(groups.values()), "summary": ""}


def to_regimes(name: str, metrics: dict) -> dict:
    """Metrics in the regime schema: returned unchanged when already there; otherwise converted
    from a flat ``{"rows": [{"method": .., <params>.., <metric>: value | {"mean",..}}]}`` table,
    grouping rows that share all non-metric fields, or left without regimes."""
    if "regimes" in metrics:
        return metrics
    rows = metrics.get("rows")
    out = dict(metrics)
    out.setdefault("study", name)
    if not isinstance(rows, list):
        out["regimes"] = []
        return out
    metric_keys = set(metrics.get("metric_keys", [])) | KNOWN_METRICS
    if metrics.get("quality", {}).get("key"):
        metric_keys.add(metrics["quality"]["key"])

    def is_metric(k: str, v: Any) -> bool:
        return _is_metric(v) and (k in metric_keys or k == "E" or k.startswith("E_") or isinstance(v, dict))

    groups: dict[str, dict] = {}
    for row in rows:
        if not isinstance(row, dict) or row.get("method") not in METHODS:
            continue
        params = {k: v for k, v in row.items() if k not in ("method", "seed") and not is_metric(k, v)}
        key = json.dumps(params, sort_keys=True, default=str)
        g = groups.setdefault(key, {"label": ", ".join(f"{k}={v}" for k, v in params.items()) or name,
                                    "params": params, "methods": {}})
        m = g["methods"].setdefault(row["method"], {})
        for k, v in row.items():
            if k not in params and k not in ("method", "seed") and is_metric(k, v):
                if isinstance(v, dict):
                    m[k] = v if "values" in v else {**v, "values": []}
                else:
                    m.setdefault(k, {"values": []})["values"].append(float(v))
    for g in groups.values():
        for m in g["methods"].values():
            for k, v in list(m.items()):
                if "mean" not in v:
                    m[k] = stat(v["values"])
    out["regimes"] = list(groups.values())
    return out


KNOWN_METRICS = {"w2", "mmd", "fd", "fid", "fd_dino", "nll", "precision", "recall", "mode_coverage", "clip", "aesthetic"}


def _is_metric(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, dict) and "mean" in v)


@dataclass
class StudyResult:
    name: str
    folder: Path
    metrics: dict
    table_md: str
    pngs: list[Path]

    @property
    def quality_key(self) -> str | None:
        return self.metrics.get("quality", {}).get("key")

    def comparisons(self, e_key: str = "E") -> list[Comparison]:
        return regime_verdicts(self.metrics, e_key=e_key) if self.quality_key else []


def load_study(name: str, folder: Path) -> StudyResult:
    """Read ``metrics.json`` (or ``table.json``), ``table.md`` and the PNGs of one results folder."""
    mfile = folder / "metrics.json"
    metrics = json.loads((mfile if mfile.exists() else folder / "table.json").read_text())
    table = (folder / "table.md").read_text() if (folder / "table.md").exists() else ""
    if name == "score_error" and "runs" in metrics and "regimes" not in metrics:
        metrics = score_error_regimes(metrics)
    elif name == "sdxl_table" and not mfile.exists():
        metrics = sdxl_regimes(metrics)
    return StudyResult(name, folder, to_regimes(name, metrics), table, sorted(folder.glob("*.png")))


# --------------------------------------------------------------------------------------------
# evidence per explanation (derived from the numbers)
# --------------------------------------------------------------------------------------------
def _count(comps: list[Comparison]) -> str:
    p = sum(c.paradox for c in comps)
    pc = sum(c.paradox and c.clear for c in comps)
    return f"{p}/{len(comps)} regimes show the paradox ({pc} clearly beyond seed spread)"


def _switch_on(c: Comparison, key: str, off_value: Any) -> bool:
    v = c.switches.get(key, c.params.get(key))
    return v is not None and v != off_value and not (isinstance(v, (int, float)) and isinstance(off_value, (int, float)) and float(v) == float(off_value))


def _on_off(comps: list[Comparison], key: str, off: Any) -> tuple[list[Comparison], list[Comparison]]:
    return [c for c in comps if _switch_on(c, key, off)], [c for c in comps if not _switch_on(c, key, off)]


def _contrast(study: str, what: str, on: list[Comparison], off: list[Comparison], pro: list, con: list,
              notes: list) -> None:
    """The control logic shared by the explanations: the paradox should appear with the factor
    switched on (``on``) and not without it (``off``). Only paradoxes beyond seed spread count as
    evidence; ones within the spread are reported as context."""
    clear_on = any(c.paradox and c.clear for c in on)
    clear_off = any(c.paradox and c.clear for c in off)
    weak_on = any(c.paradox for c in on) and not clear_on
    if off:
        msg = f"{study}, {what} off: {_count(off)}"
        if clear_off:
            con.append(msg + " — the paradox appears without this factor.")
        else:
            notes.append(msg + " (control).")
    if on:
        msg = f"{study}, {what} on: {_count(on)}"
        if clear_on and not clear_off:
            pro.append(msg + " — and not in the control regimes.")
        elif clear_on or weak_on:
            notes.append(msg + (" (within seed spread only)." if weak_on else " (as in the control)."))
        else:
            con.append(msg + " — the factor alone does not create the paradox.")


def _sample_advantage_trend(study: str, comps: list[Comparison], key: str, label: str, pro: list, con: list) -> None:
    """Spearman correlation of a factor level with CD's sample advantage dQ = Q_DirectCD - Q_CD."""
    pts = [(float(c.switches.get(key, c.params.get(key))), c.dQ) for c in comps
           if isinstance(c.switches.get(key, c.params.get(key)), (int, float))]
    if len({p[0] for p in pts}) < 2 or len(pts) < 3:
        return
    rho = spearman([p[0] for p in pts], [p[1] for p in pts])
    if math.isnan(rho):
        return
    (pro if rho > 0.3 else con).append(
        f"{study}: Spearman correlation of {label} with CD's sample advantage (Q_DirectCD - Q_CD) = {rho:+.2f} "
        f"over {len(pts)} regimes (" + ("grows with the factor" if rho > 0.3 else "does not grow with the factor") + ").")


Evidence = tuple[list[str], list[str], list[str]]


def evidence_score_approximation(studies: dict[str, StudyResult]) -> Evidence:
    """For: the paradox appears once the teacher's score is wrong (and not with the exact score),
    or CD's sample advantage grows with the score error; Direct CD's better E is only better solving
    of the discretised teacher. Against: the paradox appears with the exact score, or never."""
    pro, con, notes = [], [], []
    se = studies.get("score_error")
    if se is not None:
        comps = se.comparisons()
        on, off = _on_off(comps, "score_error", 0)
        _contrast("score_error", "score error", on, off, pro, con, notes)
        _sample_advantage_trend("score_error", comps, "score_error", "the teacher's score error", pro, con)
        if not comps:
            notes.append("score_error results have no CD / Direct CD comparison in the regime schema.")
    sa = studies.get("solver_ablation")
    if sa is not None:
        comps, comps_exact = sa.comparisons(), sa.comparisons(e_key="E_exact")
        if comps_exact:
            closer = [c for c in comps_exact if c.dE < 0]
            msg = (f"solver_ablation: Direct CD has the lower E against the teacher solver in "
                   f"{sum(c.dE > 0 for c in comps)}/{len(comps)} (solver, N) settings; CD is closer to the exact "
                   f"ODE (E_exact) in {len(closer)}/{len(comps_exact)}")
            (pro if closer else con).append(
                msg + (" — better solving of the discretised teacher is not better solving of the true ODE there."
                       if closer else " — Direct CD's advantage holds against the exact ODE too."))
        Ns = sorted({c.params["N"] for c in comps if "N" in c.params})
        if len(Ns) >= 2:
            coarse = [c for c in comps if c.params.get("N") == Ns[0]]
            fine = [c for c in comps if c.params.get("N") == Ns[-1]]
            pc, pf = sum(c.paradox for c in coarse), sum(c.paradox for c in fine)
            (pro if pc > pf else con).append(
                f"solver_ablation: paradox at the coarsest grid (N={Ns[0]}) in {pc}/{len(coarse)} solvers, at the "
                f"finest (N={Ns[-1]}) in {pf}/{len(fine)} (a less exact solver target makes it "
                + ("more" if pc > pf else "not more") + " frequent).")
    if se is None and sa is None:
        notes.append("no score_error or solver_ablation results found.")
    return pro, con, notes


def evidence_latent_space(studies: dict[str, StudyResult]) -> Evidence:
    """For: the paradox appears after a non-identity decoder but not with the identity decoder, or
    latent E fails to order decoded quality. Against: the identity decoder already shows the paradox,
    no decoder creates it, or latent E still orders decoded quality."""
    pro, con, notes = [], [], []
    ls = studies.get("latent_space")
    if ls is None:
        return pro, con, ["no latent_space results found."]
    comps = ls.comparisons()
    on, off = _on_off(comps, "decoder", "identity")
    _contrast("latent_space", "non-identity decoder", on, off, pro, con, notes)
    by_dec: dict[str, list[Comparison]] = {}
    for c in comps:
        by_dec.setdefault(str(c.params.get("decoder")), []).append(c)
    for dec, cs in by_dec.items():
        notes.append(f"decoder {dec}: " + "; ".join(
            f"{c.label}: latent E {fmt_stat(c.E_cd)} (CD) vs {fmt_stat(c.E_dcd)} (Direct CD), {c.quality_key} "
            f"{fmt_stat(c.Q_cd)} vs {fmt_stat(c.Q_dcd)}" for c in cs) + ".")
    for dec, r in (ls.metrics.get("rank_correlation") or {}).items():
        if r is None or (isinstance(r, float) and math.isnan(r)):
            continue
        (con if r > 0.5 else pro).append(
            f"decoder {dec}: Spearman correlation of latent E with decoded {ls.quality_key} over every trained "
            f"student = {r:+.2f} (" + ("latent E still orders decoded quality" if r > 0.5 else
                                         "latent E is a poor predictor of decoded quality") + ").")
    dec_cmp = ls.comparisons(e_key="E_decoded")
    flips = [c for c, d in zip(comps, dec_cmp) if (c.dE > 0) != (d.dE > 0)]
    if dec_cmp:
        (pro if flips else con).append(
            f"decoding flips which method has the lower ODE error in {len(flips)}/{len(dec_cmp)} regimes.")
    return pro, con, notes


def evidence_inductive_bias(studies: dict[str, StudyResult]) -> Evidence:
    """With the exact teacher and the identity decoder only the objective differs, so a paradox
    there is evidence for an inductive bias of CD; its dependence on capacity, budget, target policy
    and dimension says where it lives."""
    pro, con, notes = [], [], []
    ib = studies.get("inductive_bias")
    if ib is None:
        return pro, con, ["no inductive_bias results found."]
    comps = ib.comparisons()
    groups: dict[str, list[Comparison]] = {}
    for c in comps:
        groups.setdefault(c.group or "all", []).append(c)
    for g, cs in groups.items():
        line = f"{g} sweep (exact teacher, identity decoder): {_count(cs)}"
        better = [c for c in cs if c.dQ > 0]
        detail = "; ".join(f"{c.label}: dE={fmt(c.dE)}, dQ={fmt(c.dQ)}" for c in cs)
        txt = f"{line}; CD has the better samples in {len(better)}/{len(cs)} [{detail}]."
        if any(c.paradox and c.clear for c in cs):
            pro.append(txt)
        elif any(c.paradox for c in cs):
            notes.append(txt + " (paradox within seed spread only)")
        else:
            con.append(txt)
    for g, key, label in (("budget", "iters", "training iterations"), ("capacity", "params_count", "parameter count"),
                          ("dimension", "dim", "data dimension")):
        cs = [c for c in groups.get(g, []) if key in c.params]
        if len(cs) >= 3:
            rho = spearman([float(c.params[key]) for c in cs], [c.dQ for c in cs])
            if not math.isnan(rho):
                notes.append(f"{g}: Spearman correlation of {label} with CD's sample advantage (Q_DirectCD - Q_CD) "
                             f"= {rho:+.2f} over {len(cs)} regimes.")
    ema = [c for c in groups.get("target", []) if "ema" in c.params]
    if len(ema) >= 2:
        best = min(ema, key=lambda c: c.Q_cd["mean"])
        notes.append(f"target policy: CD's best {ema[0].quality_key} is at EMA rate {best.params['ema']} "
                     f"({fmt_stat(best.Q_cd)}; Direct CD {fmt_stat(best.Q_dcd)}); CD's spread over rates "
                     f"{fmt(max(c.Q_cd['mean'] for c in ema) - min(c.Q_cd['mean'] for c in ema))}.")
    return pro, con, notes


EXPLANATIONS = [
    ("Score approximation", evidence_score_approximation),
    ("Latent space", evidence_latent_space),
    ("Inductive bias", evidence_inductive_bias),
]


# --------------------------------------------------------------------------------------------
# rendering: a list of blocks -> markdown and html
# --------------------------------------------------------------------------------------------
def _md_table_to_html(md: str) -> str:
    lines = [l for l in md.strip().splitlines() if l.strip().startswith("|")]
    other = [l for l in md.strip().splitlines() if l.strip() and not l.strip().startswith("|")]
    out = "".join(f"<p>{html.escape(l)}</p>" for l in other)
    if not lines:
        return out
    rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
    head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
    out += "<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
    out += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return out + "</tbody></table>"


def render(blocks: list[tuple[str, Any]], out_dir: Path) -> tuple[str, str]:
    """Blocks ``(kind, payload)`` with kind in h1/h2/h3/p/ul/table/img -> (markdown, html)."""
    md, hb = [], []
    for kind, val in blocks:
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + val)
            hb.append(f"<{kind}>{html.escape(val)}</{kind}>")
        elif kind == "p":
            md.append(val)
            hb.append(f"<p>{html.escape(val)}</p>")
        elif kind == "ul":
            md.append("\n".join(f"- {x}" for x in val) if val else "- (none)")
            hb.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in (val or ["(none)"])) + "</ul>")
        elif kind == "table":
            md.append(val.strip())
            hb.append(_md_table_to_html(val))
        elif kind == "img":
            path = Path(val)
            rel = Path(os.path.relpath(path.resolve(), out_dir.resolve()))
            md.append(f"![{path.stem}]({rel.as_posix()})")
            data = base64.b64encode(path.read_bytes()).decode()
            hb.append(f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{html.escape(str(path))}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}figcaption{font-size:80%;color:#666}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>odecm report</title><style>{style}</style>"
            f"</head><body>{''.join(hb)}</body></html>")
    return "\n\n".join(md) + "\n", page


def _regime_table(comps: list[Comparison]) -> str:
    if not comps:
        return ""
    q = comps[0].quality_key
    lines = [f"| regime | E CD | E Direct CD | {q} CD | {q} Direct CD | seeds | verdict |", "|" + "---|" * 7]
    for c in comps:
        lines.append(f"| {c.label} | {fmt_stat(c.E_cd)} | {fmt_stat(c.E_dcd)} | {fmt_stat(c.Q_cd)} | "
                     f"{fmt_stat(c.Q_dcd)} | {c.seeds} | {c.verdict()} |")
    return "\n".join(lines)


def build_report(results: Path, out_dir: Path) -> tuple[Path, Path, dict[str, StudyResult]]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths and the studies read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    studies: dict[str, StudyResult] = {}
    for name in STUDIES:
        folder = find_latest(results, name)
        if folder is not None:
            studies[name] = load_study(name, folder)
    blocks: list[tuple[str, Any]] = [
        ("h1", "odecm: why does CD beat Direct CD on samples?"),
        ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the latest results folder of each study under "
              f"`{results}`. Studies found: {', '.join(studies) or 'none'}; missing: "
              f"{', '.join(s for s in STUDIES if s not in studies) or 'none'}. The paradox = CD has the better "
              f"samples (lower quality metric) while Direct CD has the lower ODE error E. 'Clear' = both "
              f"differences exceed twice their standard error over seeds; values are mean ± std over seeds."),
    ]
    blocks.append(("h2", "Summary"))
    summary = []
    for name, st in studies.items():
        comps = st.comparisons()
        if comps:
            better = sum(c.dQ > 0 for c in comps)
            lower = sum(c.dE > 0 for c in comps)
            summary.append(f"{name}: {_count(comps)}; Direct CD has the lower E in {lower}/{len(comps)}, "
                           f"CD the better samples ({comps[0].quality_key}) in {better}/{len(comps)}.")
    for title, fn in EXPLANATIONS:
        pro, con, _ = fn(studies)
        summary.append(f"{title}: {len(pro)} finding(s) for, {len(con)} against (details below).")
    blocks.append(("ul", summary))
    blocks.append(("h2", "Where does the paradox appear?"))
    any_rows = False
    for name, st in studies.items():
        comps = st.comparisons()
        if comps:
            any_rows = True
            blocks.append(("h3", f"{name}: {_count(comps)}"))
            blocks.append(("table", _regime_table(comps)))
            alts = []
            first = st.metrics["regimes"][0]["methods"].get("cd", {}) if st.metrics.get("regimes") else {}
            default_alts = [k for k in ("w2", "sliced_w2", "mmd2", "mode_tv") if k in first and k != st.quality_key]
            for key in st.metrics.get("alt_quality_keys", default_alts):
                alt = regime_verdicts(st.metrics, quality_key=key)
                if alt:
                    alts.append(f"{key}: {sum(c.paradox for c in alt)}/{len(alt)} (CD better in "
                                f"{sum(c.dQ > 0 for c in alt)}/{len(alt)})")
            if alts:
                blocks.append(("p", "With other sample-quality metrics (lower = better), paradox regimes: "
                                    + "; ".join(alts) + "."))
    if not any_rows:
        blocks.append(("p", "No study has CD / Direct CD comparisons yet."))
    blocks.append(("h2", "Evidence per explanation"))
    for title, fn in EXPLANATIONS:
        pro, con, notes = fn(studies)
        blocks += [("h3", title), ("p", "For:"), ("ul", pro), ("p", "Against:"), ("ul", con)]
        if notes:
            blocks += [("p", "Context:"), ("ul", notes)]
    blocks.append(("h2", "Studies"))
    for name, st in studies.items():
        blocks.append(("h3", f"{name} ({st.folder})"))
        if isinstance(st.metrics.get("summary"), str) and st.metrics["summary"]:
            blocks.append(("p", st.metrics["summary"]))
        if st.table_md:
            blocks.append(("table", st.table_md))
        for png in st.pngs:
            blocks.append(("img", png))
    md, page = render(blocks, out_dir)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path, studies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results", help="root of the results folders")
    ap.add_argument("--out", default=None, help="output folder (default <results>/report)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "report"
    md, page, studies = build_report(results, out)
    print(f"wrote {md} and {page} ({len(studies)} studies: {', '.join(studies)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
