"""The paper's Table 1 from SDXL evaluation runs: ``python -m studies.sdxl_table --runs DIR ... --out OUT``.

Each ``DIR`` is an ``sdxl.evaluate`` output folder (holding ``metrics.json``) or a ``sdxl.sample``
folder with ``eval/metrics.json``. Rows: CM and Direct CM (``labels.method`` = cd / direct_cd)
x DDIM, Euler, Heun (``labels.solver``), then one teacher row per reference solver found; columns
E (latent ODE error), FID and FD-DINO against the teacher's samples, CLIP score, aesthetic; one
table per k in (1, 2, 4). The paper's solver rows are ``ddim``, ``euler_vp`` and ``heun_vp`` (its Euler and
Heun step the VP PF-ODE in (x, t)); runs with the EDM-form ``euler`` / ``heun`` get their own rows. A row
without a run says ``missing``; a ``--runs`` folder without ``metrics.json`` becomes a row saying so,
and one that does not exist is refused (``error: --runs: ...``, exit status 2, nothing written). Runs
that differ in timestep indexing, Fréchet-distance protocol, caption count, N or guidance, or whose
reference solver is not their training solver, are listed under ``warnings`` (the numbers would not be
comparable). Writes ``table.md``,
``table.json`` and, per run, ``grid_<method>_<solver>.png``: teacher and k = 1, 2, 4 samples for the
same captions and the same initial noise, one column per caption.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["load_runs", "check_run_folders", "build_table", "render_markdown", "image_grid", "main", "METHODS", "SOLVERS", "EXTRA_SOLVERS", "TABLE_COLUMNS",
           "comparability_warnings"]

METHODS = {"cd": "CM", "direct_cd": "Direct CM"}
#: the paper's rows (its Euler / Heun are the VP-ODE solvers)
SOLVERS = {"ddim": "DDIM", "euler_vp": "Euler", "heun_vp": "Heun"}
#: further solvers shown when a run uses them (EDM forms in x/alpha, sigma/alpha)
EXTRA_SOLVERS = {"euler": "Euler (EDM)", "heun": "Heun (EDM)"}
ALL_SOLVERS = {**SOLVERS, **EXTRA_SOLVERS}
#: settings every run of one table must share (metrics.json path -> label)
SHARED = {("timestep_offset",): "timestep indexing", ("fd_protocol", "name"): "Fréchet-distance protocol",
          ("num_captions",): "number of captions", ("teacher", "grid_size"): "N",
          ("teacher", "guidance_scale"): "guidance scale"}
TABLE_COLUMNS = [("ode_error_latent", "E"), ("fid_teacher", "FID"), ("fd_dino_teacher", "FD-DINO"),
                 ("clip_score", "CLIP"), ("aesthetic", "Aesthetic")]
STEPS = ("1", "2", "4")


def load_runs(dirs: list[str | Path]) -> list[dict]:
    """``metrics.json`` of each run folder (``DIR/metrics.json`` or ``DIR/eval/metrics.json``)."""
    runs = []
    for d in dirs:
        d = Path(d)
        path = next((p for p in (d / "metrics.json", d / "eval" / "metrics.json") if p.is_file()), None)
        if path is None:
            runs.append({"dir": str(d), "error": f"no metrics.json in {d} or {d / 'eval'}"})
            continue
        m = json.loads(path.read_text())
        m["dir"] = str(path.parent)
        runs.append(m)
    return runs


def _get(d: dict, path: tuple) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def comparability_warnings(runs: list[dict]) -> list[str]:
    """Settings that differ between runs (``SHARED``), and runs whose reference solver is not their training solver."""
    ok = [r for r in runs if "error" not in r]
    out = []
    for path, what in SHARED.items():
        values = {json.dumps(_get(r, path)): [] for r in ok}
        for r in ok:
            values[json.dumps(_get(r, path))].append(Path(r["dir"]).parent.name or r["dir"])
        if len(values) > 1:
            out.append(f"runs differ in {what}: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in values.items()))
    for r in ok:
        lab, t = r.get("labels", {}), r["teacher"]
        if lab.get("solver") and lab["solver"] != t["solver"]:
            out.append(f"{r['dir']}: trained with {lab['solver']} but compared with the {t['solver']} reference")
    return out


def build_table(runs: list[dict]) -> dict:
    """``{"rows": [{"row", "method", "solver", "status", "k": {k: {col: value}}}], "columns", "steps", "warnings"}``."""
    by_key: dict[tuple[str, str], dict] = {}
    extra, teachers = [], {}
    for r in runs:
        if "error" in r:
            extra.append({"row": Path(r["dir"]).name, "status": r["error"], "k": {}})
            continue
        lab = r.get("labels", {})
        key = (lab.get("method"), lab.get("solver"))
        if key in by_key or key[0] not in METHODS or key[1] not in ALL_SOLVERS:
            extra.append({"row": f"{lab.get('method')}/{lab.get('solver')} ({Path(r['dir']).name})", "status": "ok",
                          "k": {k: {c: m.get(c) for c, _ in TABLE_COLUMNS} for k, m in r["k"].items()}, "dir": r["dir"]})
        else:
            by_key[key] = r
        t = r["teacher"]
        teachers.setdefault(t["solver"], {"row": f"Teacher {ALL_SOLVERS.get(t['solver'], t['solver'])} (N={t['grid_size']})",
                                          "status": "ok", "values": {c: t.get(c) for c, _ in TABLE_COLUMNS}})
    solvers = {**SOLVERS, **{s: n for s, n in EXTRA_SOLVERS.items() if any(k[1] == s for k in by_key) or s in teachers}}
    rows = []
    for m, mname in METHODS.items():
        for s, sname in solvers.items():
            r = by_key.get((m, s))
            if r is None:
                rows.append({"row": f"{mname} {sname}", "method": m, "solver": s, "status": "missing (no run given)", "k": {}})
            else:
                rows.append({"row": f"{mname} {sname}", "method": m, "solver": s, "status": "ok", "dir": r["dir"],
                             "k": {k: {c: v.get(c) for c, _ in TABLE_COLUMNS} for k, v in r["k"].items()},
                             "skipped": sorted(r.get("skipped", {}))})
    for s in solvers:
        if s in teachers:
            rows.append({**teachers[s], "solver": s, "method": "teacher"})
        else:
            rows.append({"row": f"Teacher {solvers[s]}", "method": "teacher", "solver": s,
                         "status": "missing (no run used this reference)"})
    ok = [r for r in runs if "error" not in r]
    settings = {what: _get(ok[0], path) for path, what in SHARED.items()} if ok else {}
    return {"rows": rows + extra, "columns": [c for c, _ in TABLE_COLUMNS], "steps": list(STEPS),
            "settings": settings, "warnings": comparability_warnings(runs)}


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def render_markdown(table: dict) -> str:
    lines = ["# Table 1: CM vs Direct CM on SDXL (FID / FD-DINO against the teacher's samples; CLIP = cosine)", ""]
    if table.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in table["settings"].items()), ""]
    if table.get("warnings"):
        lines += ["**Warnings (numbers not comparable):**", ""] + [f"- {w}" for w in table["warnings"]] + [""]
    headers = [h for _, h in TABLE_COLUMNS]
    for k in table["steps"]:
        lines += [f"## k = {k} student step{'s' if k != '1' else ''}", "",
                  "| | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
        for row in table["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {row['row']} | {row['status']} |" + " |" * (len(headers) - 1))
            elif row.get("method") == "teacher":
                vals = row["values"]
                lines.append(f"| {row['row']} | " + " | ".join(
                    "0 (reference)" if c in ("ode_error_latent", "fid_teacher", "fd_dino_teacher") else _fmt(vals.get(c))
                    for c, _ in TABLE_COLUMNS) + " |")
            elif k not in row["k"]:
                lines.append(f"| {row['row']} | no k={k} samples |" + " |" * (len(headers) - 1))
            else:
                lines.append(f"| {row['row']} | " + " | ".join(_fmt(row["k"][k].get(c)) for c, _ in TABLE_COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def image_grid(run: dict, path: str | Path, num_captions: int = 4, thumb: int = 128) -> Path | None:
    """Rows: teacher, k = 1, 2, 4; columns: the first ``num_captions`` captions (same noise)."""
    from PIL import Image, ImageDraw

    samples, ref = Path(run["samples"]), Path(run["reference"])
    num_captions = max(1, min(num_captions, len(list((ref / "images").glob("*.png")))))
    rows = [("teacher", ref / "images")] + [(f"k={k}", samples / f"k{k}" / "images") for k in run["k"]]
    label_w = 70
    canvas = Image.new("RGB", (label_w + thumb * num_captions, thumb * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, folder) in enumerate(rows):
        draw.text((4, r * thumb + thumb // 2 - 6), name, fill="black")
        for c in range(num_captions):
            f = folder / f"{c:05d}.png"
            if f.is_file():
                with Image.open(f) as im:
                    canvas.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (label_w + c * thumb, r * thumb))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def check_run_folders(dirs: list[str | Path]) -> None:
    """Every ``--runs`` entry must be an existing folder (``InputError`` naming them, before anything is
    written); a folder without ``metrics.json`` is allowed and becomes a row saying so."""
    from odecm.cli import InputError

    bad = [f"--runs: {d} is not a folder" if Path(d).exists() else f"--runs: {d} does not exist"
           for d in dirs if not Path(d).is_dir()]
    if bad:
        raise InputError("\n".join(f"{line}; allowed: an sdxl.evaluate output folder or a sample folder with eval/"
                                    for line in bad))


def main(argv=None) -> dict:
    from odecm.cli import add_check_arg, positive_int, report_check

    ap = argparse.ArgumentParser(prog="python -m studies.sdxl_table", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="sdxl.evaluate output folders (or sample folders with eval/)")
    ap.add_argument("--out", default="results/sdxl_table")
    ap.add_argument("--grid-captions", type=positive_int, default=4, help="captions per image grid (>= 1)")
    add_check_arg(ap)
    args = ap.parse_args(argv)
    check_run_folders(args.runs)
    if report_check(args, "studies.sdxl_table", runs=len(args.runs), out=args.out):
        return None
    runs = load_runs(args.runs)
    table = build_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grids = {}
    for r in runs:
        if "error" in r:
            continue
        lab = r.get("labels", {})
        name = f"grid_{lab.get('method', 'run')}_{lab.get('solver', Path(r['dir']).parent.name)}.png"
        grids[r["dir"]] = str(image_grid(r, out / name, args.grid_captions))
    table["grids"] = grids
    md = render_markdown(table)
    (out / "table.md").write_text(md)
    (out / "table.json").write_text(json.dumps(table, indent=2))
    print(md)
    return table


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
