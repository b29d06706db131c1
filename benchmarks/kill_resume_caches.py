"""Kill/resume targets without checkpoints: (c) concurrent ``sdxl.reference`` runs, (d) ``sdxl.latent_cache``.

(c) ``reference``: 8 captions, the tiny SDXL teacher, DDIM on the N = 10 skip grid, 32 px, shards of 2
captions. Two processes run the same command on the same cache at once; one of them (drawn at
random) is killed and restarted at once, up to 3 kills a run; then both finish and a third run of
the command (what a user reruns) completes whatever is missing. After every kill: every shard file is
readable and no caption is in two shards. At the end: the folder is complete, each caption's latent
is there once and equals the uninterrupted reference's (max abs difference), every PNG decodes to
the uninterrupted reference's pixels, and no caption done at a kill was lost.

(d) ``latent_cache``: 12 captioned images of mixed sizes + 1 corrupt file, shards of 2 samples; the
build is killed and rerun. After every kill: ``index.json`` parses and every shard it lists is
readable, with no sample twice. At the end: the same cache key, complete, every sample once with
tensors equal to the uninterrupted build's, and the same skip counts (by reason).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from odecm.atomic import TEMP_SUFFIX

from .kill_resume_runner import Child, finish, fresh_entries, kill_moment, max_abs_diff, read_tensors, start

__all__ = ["reference_worker", "latent_cache_worker", "run_reference_target", "run_latent_cache_target",
           "CAPTIONS"]

CAPTIONS = ["a red cat on a sofa", "a blue dog in the snow", "a green tree by a lake", "a yellow car at night",
            "a white house on a hill", "a black bird in the rain", "an orange fish in a bowl", "a purple flower"]
MAX_KILLS_PER_RUN = 3


# --------------------------------------------------------------------------------------------- workers
def reference_worker(cache_dir: str, captions: str, model: str, shard_size: int = 2) -> None:
    """``python -m sdxl.reference`` of target (c)."""
    from odecm.cli import run_main
    from sdxl.reference import main

    run_main(main, ["--set", f"captions={captions}", f"model.pretrained={model}", "model.dtype=fp32",
                    f"cache_dir={cache_dir}", "resolution=32", "grid_size=10", f"shard_size={shard_size}",
                    "batch_size=2", "progress=false", "device=cpu"])


def latent_cache_worker(data: str, out: str, model: str) -> None:
    """``python -m sdxl.latent_cache`` of target (d)."""
    from odecm.cli import run_main
    from sdxl.latent_cache import main

    run_main(main, ["--set", f"data={data}", f"out={out}", f"model={model}", "resolution=32", "crop=center",
                    "batch_size=2", "shard_size=2", "device=cpu", "max_skip_fraction=0.2"])


# --------------------------------------------------------------------------------------------- (c) reference
def _reference_folder(cache: Path) -> Path | None:
    found = sorted((cache / "reference").glob("*/")) if (cache / "reference").is_dir() else []
    return found[0] if found else None


def _shard_state(folder: Path | None) -> tuple[list[str], dict[int, str]]:
    """(problems, caption index -> shard name) of the shard files present now."""
    problems, owner = [], {}
    if folder is None:
        return problems, owner
    for f in sorted((folder / "shards").glob("*.safetensors")):
        try:
            idx = read_tensors(f)["indices"].tolist()
        except Exception as err:  # noqa: BLE001 -- a truncated or malformed shard is the finding
            problems.append(f"{f.name}: unreadable ({type(err).__name__})")
            continue
        for i in idx:
            if i in owner:
                problems.append(f"caption {i} in two shards ({owner[i]}, {f.name})")
            owner[i] = f.name
    return problems, owner


def _latents(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((folder / "shards").glob("*.safetensors")):
        t = read_tensors(f)
        for i, lat in zip(t["indices"].tolist(), t["latents"]):
            out[f"caption {i}"] = lat
    return out


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _final_reference(folder: Path | None, ref: Path, n: int) -> tuple[list[str], float]:
    if folder is None:
        return ["no reference folder"], float("inf")
    problems, owner = _shard_state(folder)
    if sorted(owner) != list(range(n)):
        problems.append(f"captions done {sorted(owner)} (want 0..{n - 1})")
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
    if not manifest.get("complete"):
        problems.append("manifest.json does not say complete")
    diff = max_abs_diff(_latents(folder), _latents(ref)) if not problems else float("inf")
    for i in range(n):
        name = f"images/{i:05d}.png"
        try:
            if not np.array_equal(_pixels(folder / name), _pixels(ref / name)):
                problems.append(f"{name}: pixels differ from the uninterrupted reference")
        except Exception as err:  # noqa: BLE001 -- a missing or truncated PNG is the finding
            problems.append(f"{name}: {type(err).__name__}: {str(err)[:80]}")
    return problems, diff


def _computed(child: Child) -> int:
    """``captions_computed`` from the JSON line a finished ``sdxl.reference`` prints (0 if none)."""
    for line in reversed(child.log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and "captions_computed" in line:
            return int(json.loads(line)["captions_computed"])
    return 0


def _tmp_present(folder: Path | None, since: float) -> bool:
    """A write in progress: a temporary file (``odecm.atomic``) written since ``since`` (``time.time()``) in
    ``folder`` or its ``shards/``."""
    if folder is None:
        return False
    is_tmp = (lambda name: name.endswith(TEMP_SUFFIX))
    return bool(fresh_entries(folder, since, is_tmp) or fresh_entries(folder / "shards", since, is_tmp))


def _writing(folder_of, since: float) -> Any:
    """Probe of a ``write`` kill: a temporary file written since ``since``, or a new PNG appeared since
    the probe was made (a shard's images are being written; its shard file comes after them)."""
    def count() -> int:
        folder = folder_of()
        try:
            return len(list((folder / "images").iterdir())) if folder is not None else 0
        except OSError:
            return 0

    first = count()

    def probe() -> bool:
        return _tmp_present(folder_of(), since) or count() > first
    return probe


def run_reference_target(work: Path, model: Path, kills: int, rng: np.random.Generator,
                         spawn: bool | None = None) -> dict[str, Any]:
    """Target (c); returns the figures (see module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    captions = work / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    n, logs = len(CAPTIONS), work / "logs"
    spec = "benchmarks.kill_resume_caches:reference_worker"
    kw = {"captions": str(captions), "model": str(model)}
    child = start("reference", spec, {"cache_dir": str(work / "uninterrupted"), **kw}, logs / "uninterrupted.log", spawn)
    if finish(child) != 0:
        raise RuntimeError(f"reference: the uninterrupted run failed:\n{child.log_tail()}")
    window, ref = time.perf_counter() - child.started, _reference_folder(work / "uninterrupted")
    hang = max(120.0, 20 * window)  # a worker taking longer is stuck: killed and counted as a crash
    out: dict[str, Any] = {"target": "reference (2 processes)", "uninterrupted_seconds": window, "kills": 0,
                           "kills_survived": 0, "positions": {}, "runs": 0, "runs_exact": 0, "published_lost": 0,
                           "computed": 0, "needed": 0, "crashes": [], "events": [], "max_abs_weight_diff": 0.0,
                           "problems": []}
    positions: dict[str, int] = {}
    while out["kills"] < kills or out["runs"] == 0:
        r = out["runs"]
        out["runs"] += 1
        cache = work / f"run{r}"
        folder_of = (lambda cache=cache: _reference_folder(cache))
        seg = {"A": 0, "B": 0}
        children = {p: start(f"reference {p}", spec, {"cache_dir": str(cache), **kw}, logs / f"run{r}_{p}0.log", spawn)
                    for p in ("A", "B")}
        kills_here, done_at_kills = 0, set()
        while kills_here < MAX_KILLS_PER_RUN and out["kills"] < kills:
            running = [p for p, c in children.items() if c.poll() is None]
            if not running:
                break
            victim = running[int(rng.integers(len(running)))]
            mode = "random" if out["kills"] % 2 == 0 else "write"
            since = time.time()
            outcome = kill_moment(children[victim], mode, rng, window,
                                  writing=_writing(folder_of, since) if mode == "write" else None, timeout=hang)
            if outcome != "killed":
                continue
            out["kills"] += 1
            kills_here += 1
            problems, owner = _shard_state(folder_of())
            done_at_kills |= set(owner)
            where = "mid_write" if _tmp_present(folder_of(), since) else ("after_png" if mode == "write" else "other")
            positions[where] = positions.get(where, 0) + 1
            out["kills_survived"] += int(not problems)
            out["events"].append({"run": r, "victim": victim, "mode": mode, "position": where, "done": sorted(owner),
                                  "problems": problems})
            seg[victim] += 1
            children[victim] = start(f"reference {victim}", spec, {"cache_dir": str(cache), **kw},
                                     logs / f"run{r}_{victim}{seg[victim]}.log", spawn)
        for p, c in children.items():
            status = finish(c, hang)
            out["computed"] += _computed(c) if status == 0 else 0
            if status != 0:
                out["crashes"].append({"run": r, "process": p, "status": status, "log": c.log_tail()})
        finisher = start("reference rerun", spec, {"cache_dir": str(cache), **kw}, logs / f"run{r}_rerun.log", spawn)
        if finish(finisher, hang) != 0:
            out["crashes"].append({"run": r, "process": "rerun", "status": finisher.returncode,
                                   "log": finisher.log_tail()})
        out["computed"] += _computed(finisher)
        out["needed"] += n
        problems, diff = _final_reference(folder_of(), ref, n)
        lost = done_at_kills - set(_shard_state(folder_of())[1])
        out["published_lost"] += len(lost)
        out["max_abs_weight_diff"] = max(out["max_abs_weight_diff"], diff)
        out["problems"] += [f"run {r}: {p}" for p in problems]
        out["runs_exact"] += int(not problems and diff == 0.0 and not lost)
    out["positions"] = positions
    out["work_redone_label"] = (f">= {max(0, out['computed'] - out['needed'])} captions computed twice "
                                f"(finished processes only)")
    out["steps_redone"] = max(0, out["computed"] - out["needed"])
    return out


# --------------------------------------------------------------------------------------------- (d) latent cache
def _cache_folder(out: Path) -> Path | None:
    found = sorted(p for p in out.glob("*/") if p.is_dir()) if out.is_dir() else []
    return found[0] if found else None


def _cache_state(folder: Path | None) -> tuple[list[str], dict[str, dict[str, np.ndarray]], dict]:
    """(problems, sample name -> tensors, index) of the shards ``index.json`` lists."""
    if folder is None or not (folder / "index.json").exists():
        return [], {}, {}
    problems, samples = [], {}
    try:
        index = json.loads((folder / "index.json").read_text())
    except ValueError as err:
        return [f"index.json: {err}"], {}, {}
    from safetensors import safe_open

    for file, entry in sorted(index.get("shards", {}).items()):
        if entry["count"] == 0:
            continue
        try:
            tensors = read_tensors(folder / file)
            with safe_open(str(folder / file), "np") as fh:
                names = json.loads(fh.metadata()["names"])
        except Exception as err:  # noqa: BLE001 -- a listed shard that is missing or truncated is the finding
            problems.append(f"{file}: {type(err).__name__}")
            continue
        if len(names) != entry["count"]:
            problems.append(f"{file}: {len(names)} samples, index.json says {entry['count']}")
        for j, name in enumerate(names):
            if name in samples:
                problems.append(f"sample {name} twice")
            samples[name] = {k: v[j] for k, v in tensors.items()}
    return problems, samples, index


def run_latent_cache_target(work: Path, model: Path, kills: int, rng: np.random.Generator,
                            spawn: bool | None = None) -> dict[str, Any]:
    """Target (d); returns the figures (see module docstring)."""
    from sdxl.data import make_synthetic_dataset

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        make_synthetic_dataset(data, 12, size=[(40, 48), (36, 36), (48, 40)], seed=0, corrupt=1)
    spec, logs = "benchmarks.kill_resume_caches:latent_cache_worker", work / "logs"
    kw = {"data": str(data), "model": str(model)}
    child = start("latent_cache", spec, {"out": str(work / "uninterrupted"), **kw}, logs / "uninterrupted.log", spawn)
    if finish(child) != 0:
        raise RuntimeError(f"latent_cache: the uninterrupted build failed:\n{child.log_tail()}")
    window = time.perf_counter() - child.started
    hang = max(120.0, 20 * window)  # a worker taking longer is stuck: killed and counted as a crash
    ref_folder = _cache_folder(work / "uninterrupted")
    _, ref_samples, ref_index = _cache_state(ref_folder)
    out: dict[str, Any] = {"target": "latent_cache", "uninterrupted_seconds": window, "kills": 0, "kills_survived": 0,
                           "positions": {}, "runs": 0, "runs_exact": 0, "published_lost": 0, "steps_redone": 0,
                           "crashes": [], "events": [], "max_abs_weight_diff": 0.0, "problems": []}
    positions: dict[str, int] = {}
    while out["kills"] < kills or out["runs"] == 0:
        r = out["runs"]
        out["runs"] += 1
        cache, segment, done_at_kills = work / f"run{r}", 0, set()
        folder_of = (lambda cache=cache: _cache_folder(cache))

        while True:
            since = time.time()
            writing = (lambda since=since: _tmp_present(folder_of(), since))
            child = start("latent_cache", spec, {"out": str(cache), **kw}, logs / f"run{r}_seg{segment}.log", spawn)
            segment += 1
            if out["kills"] >= kills:
                finish(child, hang)
                outcome = "finished"
            else:
                mode = "random" if out["kills"] % 2 == 0 else "write"
                outcome = kill_moment(child, mode, rng, window, writing=writing if mode == "write" else None,
                                      timeout=hang)
            if outcome == "killed":
                out["kills"] += 1
                where = "mid_write" if folder_of() is not None and writing() else "other"
                positions[where] = positions.get(where, 0) + 1
                problems, samples, _ = _cache_state(folder_of())
                done_at_kills |= set(samples)
                out["kills_survived"] += int(not problems)
                out["events"].append({"run": r, "segment": segment, "mode": mode, "position": where,
                                      "samples_done": len(samples), "problems": problems})
                continue
            if child.returncode != 0:
                out["crashes"].append({"run": r, "segment": segment, "status": child.returncode, "log": child.log_tail()})
                if len([c for c in out["crashes"] if c["run"] == r]) >= 3:
                    break
                continue
            break
        folder = folder_of()
        problems, samples, index = _cache_state(folder)
        if folder is None or folder.name != ref_folder.name:
            problems.append(f"cache key {folder and folder.name} differs from {ref_folder.name}")
        if not index.get("complete"):
            problems.append("index.json does not say complete")
        if sorted(samples) != sorted(ref_samples):
            problems.append(f"samples {sorted(samples)} (want {sorted(ref_samples)})")
        for key in ("num_samples", "skipped", "skipped_by_reason"):
            if index.get(key) != ref_index.get(key):
                problems.append(f"index.json {key}: {index.get(key)} (uninterrupted: {ref_index.get(key)})")
        diff = (max_abs_diff({f"{s}/{k}": v for s, d in samples.items() for k, v in d.items()},
                             {f"{s}/{k}": v for s, d in ref_samples.items() for k, v in d.items()})
                if sorted(samples) == sorted(ref_samples) else float("inf"))
        units = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()] if folder else []
        out["steps_redone"] += max(0, sum(u.get("event") == "unit" for u in units) - index.get("num_units", 0))
        out["published_lost"] += len(done_at_kills - set(samples))
        out["max_abs_weight_diff"] = max(out["max_abs_weight_diff"], diff)
        out["problems"] += [f"run {r}: {p}" for p in problems]
        out["runs_exact"] += int(not problems and diff == 0.0)
    out["positions"] = positions
    out["work_redone_label"] = f"{out['steps_redone']} finished shards encoded again"
    return out
