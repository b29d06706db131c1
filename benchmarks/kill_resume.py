"""Kill -9 at random moments, restart, and check what survived: checkpoints, references, latent caches.

    python -m benchmarks.kill_resume [--kills 6] [--seed 0] [--targets trainer,sdxl_train,reference,latent_cache]
                                     [--work DIR] [--keep] [--spawn] [--json OUT.json]

Targets (each on CPU, tiny models; details in the target modules):

* ``trainer`` (a): the generic ``odecm.training.Trainer`` on a small CD problem (``kill_resume_train``);
* ``sdxl_train`` (b): ``sdxl.train --config tiny_cpu`` with ``--resume latest`` (``kill_resume_train``);
* ``reference`` (c): two ``sdxl.reference`` processes at once on the same cache, killed and restarted
  (``kill_resume_caches``);
* ``latent_cache`` (d): ``sdxl.latent_cache`` builds, killed and rerun (``kill_resume_caches``).

Each target first runs once uninterrupted (its duration sets the kill window). Then runs are started
and killed with SIGKILL until ``--kills`` kills have happened; kill moments alternate between *random*
(uniform over the uninterrupted duration after the start) and *write* (at the first sight of a write in
progress; for checkpoints, once one checkpoint is published); ``sdxl_train``'s third kill comes right after the final checkpoint is published (*final*).
After every kill the on-disk state is checked; every run is finished by restarts and compared with
the uninterrupted one. The table: kills, kills survived (state valid after the kill and the restart
did not crash), runs and runs equal to the uninterrupted one, where kills landed, work redone (steps
or captions / samples computed again), published work lost, and the max abs difference of the final
weights (or latents) against the uninterrupted run. Seeded: the same ``--seed`` draws the same kill
moments (the exact kill points still depend on the machine's speed).

Workers are forked from this process after it imported torch / diffusers once (``--spawn``: fresh
``python`` processes instead; slower by an import per restart, same checks).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .kill_resume_runner import finish, fresh_entries, kill_all, kill_moment, start, warm_imports
from .kill_resume_train import SDXL_TRAIN, TRAINER, check_latest, final_comparison, kill_position, logged_steps

__all__ = ["main", "run_train_target", "kill_modes", "format_table", "TARGETS"]

TARGETS = ("trainer", "sdxl_train", "reference", "latent_cache")


def kill_modes(n: int, final_at: int | None = None) -> list[str]:
    """``random``, ``write``, ``random``, ...; with ``final_at=i`` the i-th kill (0-based) is ``final``."""
    modes = ["random" if i % 2 == 0 else "write" for i in range(n)]
    if final_at is not None and final_at < n:
        modes[final_at] = "final"
    return modes


def _checkpoint_probe(out: Path, mode: str, train_steps: int, since: float):
    """``writing()`` for a ``write`` kill (a ``.tmp_step_*`` checkpoint folder made since ``since``) or a
    ``final`` kill (``latest`` names the last step)."""
    ckdir = out / "checkpoints"
    if mode == "final":
        want = f"step_{train_steps:07d}"

        def final() -> bool:
            try:
                return (ckdir / "latest").read_text().strip() == want
            except OSError:
                return False
        return final

    def writing() -> bool:
        return bool(fresh_entries(ckdir, since, lambda name: name.startswith(".tmp_step_")))
    return writing


def _last_logged_step(out: Path) -> int:
    steps = [r.get("step") for r in logged_steps(out) if isinstance(r.get("step"), int)]
    return max(steps) if steps else 0


def run_train_target(target: dict, work: Path, kills: int, rng: np.random.Generator,
                     spawn: bool | None = None, extra: dict[str, Any] | None = None, final_at: int | None = None,
                     modes: list[str] | None = None, max_crashes: int = 3, max_runs: int = 20) -> dict[str, Any]:
    """Target (a) or (b): the uninterrupted run, then killed runs restarted as a user would (resume
    latest; a fresh start with overwrite when there is nothing to resume). ``modes`` (default
    ``kill_modes(kills, final_at)``) gives each kill's moment; ``extra`` overrides the target's
    worker arguments. Returns the figures."""
    kwargs = {**target["kwargs"], **(extra or {})}
    name, spec, train_steps = target["name"], target["spec"], kwargs["train_steps"]
    logs = work / "logs"
    ref = work / f"{name}_uninterrupted"
    child = start(name, spec, {"out_dir": str(ref), **kwargs}, logs / f"{name}_uninterrupted.log", spawn)
    if finish(child) != 0:
        raise RuntimeError(f"{name}: the uninterrupted run failed (status {child.returncode}):\n{child.log_tail()}")
    window = time.perf_counter() - child.started
    hang = max(120.0, 20 * window)  # a worker taking longer is stuck: killed and counted as a crash
    out: dict[str, Any] = {"target": name, "uninterrupted_seconds": window, "kills": 0, "kills_survived": 0,
                           "positions": Counter(), "runs": 0, "runs_exact": 0, "steps_redone": 0,
                           "published_lost": 0, "refused_fresh_restarts": 0, "crashes": [], "events": [],
                           "max_abs_weight_diff": 0.0, "max_abs_loss_diff": 0.0, "problems": []}
    modes = list(modes) if modes is not None else kill_modes(kills, final_at)
    kills = len(modes)
    while (out["kills"] < kills or out["runs"] == 0) and out["runs"] < max_runs:
        run_dir = work / f"{name}_run{out['runs']}"
        out["runs"] += 1
        resume, overwrite, segment, crashes = False, False, 0, 0
        while True:
            log = logs / f"{name}_run{out['runs'] - 1}_seg{segment}.log"
            started_at = time.time()
            child = start(name, spec, {"out_dir": str(run_dir), **kwargs, "resume": resume, "overwrite": overwrite},
                          log, spawn)
            segment += 1
            mode = modes[out["kills"]] if out["kills"] < kills else None
            if mode is None:
                finish(child, hang)
                outcome = "finished"
            else:
                probe = _checkpoint_probe(run_dir, mode, train_steps, started_at) if mode != "random" else None
                before = check_latest(run_dir)[1]["step"]
                # a write kill waits for a published checkpoint, which the cut write must leave intact
                settle = (lambda run_dir=run_dir: (run_dir / "checkpoints" / "latest").exists())
                outcome = kill_moment(child, mode, rng, window, writing=probe, settle=settle, timeout=hang)
            if outcome == "killed":
                out["kills"] += 1
                ok, info = check_latest(run_dir)
                logged = _last_logged_step(run_dir)
                position = "after_final_checkpoint" if mode == "final" else kill_position(run_dir, started_at)
                out["positions"][position] += 1
                # steps this segment logged past the surviving checkpoint (a log untouched since the
                # segment started still shows an earlier segment's steps, already counted)
                fresh_log = (run_dir / "log.jsonl").exists() and (run_dir / "log.jsonl").stat().st_mtime >= started_at
                redone = max(0, logged - (info["step"] or 0)) if fresh_log else 0
                out["steps_redone"] += redone
                lost = before is not None and (info["step"] is None or info["step"] < before)
                out["published_lost"] += int(lost)
                event = {"run": out["runs"] - 1, "segment": segment, "mode": mode, "at_s": time.perf_counter() - child.started,
                         "position": position, "latest_ok": ok, "latest_step": info["step"], "last_logged": logged,
                         "leftovers": info["leftovers"], "problem": info["problem"]}
                out["events"].append(event)
                out["kills_survived"] += int(ok and not lost)  # the restart's outcome is checked below
                resume, overwrite = True, False
                continue
            status = child.returncode
            if status == 0:
                break
            tail = child.log_tail()
            if status == 2 and resume and "nothing to resume" in tail:
                out["refused_fresh_restarts"] += 1  # killed before the first checkpoint: start afresh
                resume, overwrite = False, True
                continue
            crashes += 1
            out["crashes"].append({"run": out["runs"] - 1, "segment": segment, "status": status, "log": tail})
            if out["events"] and out["events"][-1]["run"] == out["runs"] - 1:
                out["kills_survived"] -= int(out["events"][-1]["latest_ok"])  # the restart after it failed
                out["events"][-1]["restart_failed"] = True
            if crashes >= max_crashes:
                out["problems"].append(f"run {out['runs'] - 1}: {crashes} failed restarts; gave up")
                break
            resume, overwrite = True, False
        final = final_comparison(run_dir, ref, train_steps, target["lora"])
        diffs = [final["max_abs_weight_diff"], final["max_abs_loss_diff"], final.get("max_abs_lora_diff", 0.0)]
        lora_diff = final.get("max_abs_lora_diff", 0.0)  # a missing LoRA file is listed under problems
        out["max_abs_weight_diff"] = max(out["max_abs_weight_diff"], final["max_abs_weight_diff"],
                                         lora_diff if math.isfinite(lora_diff) else 0.0)
        out["max_abs_loss_diff"] = max(out["max_abs_loss_diff"], final["max_abs_loss_diff"])
        out["problems"] += [f"run {out['runs'] - 1}: {p}" for p in final["problems"]]
        out["runs_exact"] += int(not final["problems"] and all(d == 0.0 for d in diffs))
    out["positions"] = dict(out["positions"])
    return out


# ------------------------------------------------------------------------------------------------ table
def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return "0" if x == 0 else f"{x:.2e}"
    return str(x)


def format_table(results: list[dict[str, Any]]) -> str:
    """One markdown row per target."""
    head = ["target", "kills survived / kills", "runs equal to uninterrupted / runs", "where kills landed",
            "work redone", "published work lost", "max abs diff vs uninterrupted", "restart crashes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        where = ", ".join(f"{k} {v}" for k, v in sorted(r["positions"].items())) or "-"
        redone = r.get("work_redone_label") or f"{r['steps_redone']} steps"
        lines.append("| " + " | ".join([
            r["target"], f"{r['kills_survived']} / {r['kills']}", f"{r['runs_exact']} / {r['runs']}", where, redone,
            str(r["published_lost"]), _fmt(r["max_abs_weight_diff"]), str(len(r["crashes"]))]) + " |")
    return "\n".join(lines)


def _run_target(name: str, work: Path, model: Path | None, args: argparse.Namespace,
                rng: np.random.Generator) -> dict[str, Any]:
    t1 = time.perf_counter()
    if name == "trainer":
        r = run_train_target(TRAINER, work / name, args.kills, rng, args.spawn)
    elif name == "sdxl_train":
        r = run_train_target(SDXL_TRAIN, work / name, args.kills, rng, args.spawn, extra={"model": str(model)},
                             final_at=2)
    else:
        from . import kill_resume_caches as caches

        run = caches.run_reference_target if name == "reference" else caches.run_latent_cache_target
        r = run(work / name, model, args.kills, rng, args.spawn)
    r["seconds"] = time.perf_counter() - t1
    print(f"[kill_resume] {name}: {r['kills_survived']}/{r['kills']} kills survived, {r['runs_exact']}/{r['runs']} "
          f"runs equal to the uninterrupted one, max abs diff {_fmt(r['max_abs_weight_diff'])} "
          f"({r['seconds']:.0f} s)", flush=True)
    for p in r["problems"]:
        print(f"[kill_resume]   problem: {p}", flush=True)
    for c in r["crashes"]:
        print(f"[kill_resume]   restart crashed (status {c['status']}): {c['log'].splitlines()[-1:]}", flush=True)
    return r


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kill_resume", description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=6, help="kills per target (default 6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary folder, deleted unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--spawn", action="store_const", const=True, default=None,
                    help="fresh python processes instead of forks (default: fork while that is safe)")
    ap.add_argument("--json", default=None, help="also write the figures (and every kill event) here")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.kills < 0:
        ap.error(f"--targets: unknown {unknown}; allowed: {list(TARGETS)}" if unknown else "--kills: allowed >= 0")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    _isolate_caches(work)
    t0 = time.perf_counter()
    warm = 0.0 if args.spawn else warm_imports(sdxl=any(t != "trainer" for t in targets))
    print(f"[kill_resume] work folder {work}; imports {warm:.1f} s; {args.kills} kills per target; seed {args.seed}",
          flush=True)
    rng = np.random.default_rng(args.seed)
    results = []
    model = None
    if any(t != "trainer" for t in targets):
        from sdxl.tiny import cached_tiny_sdxl

        model = cached_tiny_sdxl(seed=0)  # built once into the working folder's cache (_isolate_caches)
    try:
        for name in targets:
            results.append(_run_target(name, work, model, args, rng))
    finally:
        kill_all()  # no worker outlives the benchmark, whatever happened
    print()
    print(format_table(results))
    print(f"\n[kill_resume] total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "kills": args.kills, "seed": args.seed,
                                               "spawn": args.spawn, "results": results}, indent=1, default=str))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _isolate_caches(work: Path) -> None:
    """Keep odecm's cache folder (``odecm.runs.cache_root()``: file digests, the tiny model) inside the
    working folder (nothing written to ~/.cache)."""
    import os

    os.environ["ODECM_CACHE_DIR"] = str(work / "cache" / "odecm")


if __name__ == "__main__":
    main()
