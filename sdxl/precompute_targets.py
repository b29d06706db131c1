"""Direct CD scheme (c): store the teacher's ODE endpoints once, train on them many times.

    python -m sdxl.precompute_targets --config sdxl/configs/direct_cd_ddim.yaml [--set ...]
    python -m sdxl.train --config sdxl/configs/direct_cd_ddim.yaml --set data.source=targets data.path=OUT

A Direct CD target ``f_solver(x_{t_n}, t_n, 0)`` depends on the teacher, the solver, ``x_{t_n}`` and
``n`` only, not on the student, so it can be computed once. For every training example (in dataset
order) and each of ``precompute.targets_per_example`` draws: ``n ~ U{1..N}`` (``distill.index_scheme``
within each precompute batch), ``x_{t_n} = alpha x_0 + sigma eps``, and the endpoint from
``odecm.objectives.DirectCDTarget`` (``distill.mask_mode``). Stored per sample, in safetensors shards
``targets-XXXXX.safetensors`` plus ``index.json``::

    x_tn (4, h, w), n (), target (4, h, w), prompt_embeds (77, 2048), text_embeds (1280,), time_ids (6,)

Randomness of batch ``b`` comes from a generator seeded by ``(distill.seed, b)``, so the stored
targets do not depend on the number of processes (``accelerate launch`` splits batches over ranks,
rank r taking batches b = r, r + W, ...). A rerun skips finished shards; the folder's
``precompute_config.json`` records what the targets depend on, and a rerun with another teacher,
solver, grid, seed or data into the same folder is refused (folders never mix). ``index.json`` names
the solver, grid, indexing and teacher, and ``sdxl.train`` refuses targets that do not match its
config. Training with ``data.source=targets`` draws nothing: the same (x_tn, n, endpoint) pairs are
reused every epoch, which is the difference between scheme (c) and online Direct CD.

Config checks (``sdxl.checks``, e.g. ``distill.method`` must be ``direct_cd``) run before any model
loads or any folder is made.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from odecm.cli import InputError, add_config_args, launch_world_size, overrides_from, report_check, run_main
from odecm.config import config_to_dict
from odecm.objectives import DirectCDTarget, add_noise, draw_indices
from odecm.runs import diff_configs

from .batches import TARGET_KEYS, TargetDataset, batch_cond, batch_posterior, collate_targets, source_dataset
from .build import apply_speed_options, build_teacher_side, make_accelerator, resolve_pretrained
from .checks import check_config
from .teacher import load_sdxl, resolve_dtype
from .train_config import SDXLTrainConfig, load_train_config

__all__ = ["TargetDataset", "collate_targets", "precompute", "targets_folder", "main", "TARGET_KEYS"]

CONFIG_FILE = "precompute_config.json"


def targets_folder(cfg: SDXLTrainConfig) -> Path:
    """``precompute.out``, or ``<out_dir>/targets``."""
    return Path(cfg.precompute.out or Path(cfg.out_dir) / "targets")


def _defining(cfg: SDXLTrainConfig) -> dict:
    """What the stored targets depend on (a rerun may change anything else, e.g. worker counts)."""
    c = config_to_dict(cfg)
    data = {k: v for k, v in c["data"].items() if k not in ("num_workers", "vae_batch_size")}
    return {"model": c["model"], "teacher": c["teacher"], "data": data, "precompute": c["precompute"],
            "distill": {k: c["distill"][k] for k in ("method", "solver", "grid_size", "grid", "index_scheme",
                                                     "mask_mode", "seed")}}


def _check_folder(out: Path, cfg: SDXLTrainConfig) -> None:
    """A rerun into ``out`` must have been started with the same defining config."""
    if not out.exists() or not any(out.iterdir()):
        return
    key = "precompute.out" if cfg.precompute.out else "out_dir"
    stored = out / CONFIG_FILE
    if not stored.exists():
        raise InputError(f"{key}: {str(out)!r} is not empty and holds no {CONFIG_FILE} (not a precompute_targets "
                         "folder); allowed: a new or empty folder, or the folder of an earlier run of this config")
    diffs = diff_configs(json.loads(stored.read_text()), _defining(cfg))
    if diffs:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:6])
        raise InputError(f"{key}: {str(out)!r} holds targets of another config ({lines}); allowed: a new folder "
                         "(targets of two configs never mix)")


def door_checks(cfg: SDXLTrainConfig, world_size: int) -> Path:
    """The checks before anything loads or is written (``sdxl.checks.check_config``, the targets folder);
    returns the targets folder. ``--check`` runs exactly these."""
    check_config(cfg, world_size, command="precompute")
    out = targets_folder(cfg)
    _check_folder(out, cfg)
    return out


def precompute(cfg: SDXLTrainConfig, accelerator=None, progress: bool = True) -> Path:
    """Compute and store Direct CD targets for every example of ``cfg.data`` (see module docstring)."""
    from tqdm.auto import tqdm

    acc = accelerator or make_accelerator(cfg)
    out = door_checks(cfg, acc.num_processes)
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(_defining(cfg), indent=2))
    pretrained = resolve_pretrained(cfg, acc)
    src = cfg.data.source
    parts = load_sdxl(pretrained, vae=cfg.model.vae, dtype=cfg.model.dtype, vae_dtype=cfg.model.vae_dtype,
                      device=acc.device, text_encoders=src in ("images", "synthetic") or cfg.teacher.uncond == "empty",
                      load_vae=src in ("images", "synthetic"), variant=cfg.model.variant, revision=cfg.model.revision)
    apply_speed_options(parts.unet, cfg, trainable=False)
    side = build_teacher_side(cfg, parts, parts.unet, base_model=False)
    schedule, grid = side.schedule, side.grid
    provider = DirectCDTarget(side.teacher, side.solver, grid, mask_mode=cfg.distill.mask_mode)

    dataset, collate, _ = source_dataset(cfg, acc)  # fixed dataset order, the loaders training uses
    P = cfg.precompute
    store_dtype = resolve_dtype(P.dtype)
    num_batches = (len(dataset) + P.batch_size - 1) // P.batch_size
    per_shard = max(1, P.shard_size // (P.batch_size * P.targets_per_example))
    num_shards = (num_batches + per_shard - 1) // per_shard
    mine = [s for s in range(num_shards) if s % acc.num_processes == acc.process_index]
    get = getattr(dataset, "try_get", dataset.__getitem__)
    t0, calls = time.perf_counter(), 0
    bar = tqdm(total=len(mine), disable=not (progress and acc.is_main_process), desc="precompute targets")
    for shard in mine:
        name = f"targets-{shard:05d}.safetensors"
        if (out / name).exists():
            bar.update(1)
            continue
        rows: dict[str, list] = {k: [] for k in TARGET_KEYS}
        skipped = 0
        for b in range(shard * per_shard, min((shard + 1) * per_shard, num_batches)):
            idx = range(b * P.batch_size, min((b + 1) * P.batch_size, len(dataset)))
            items = [get(i) for i in idx]  # unreadable images are skipped (not substituted), and counted
            skipped += sum(it is None for it in items)
            items = [it for it in items if it is not None]
            if not items:
                continue
            batch = collate(items)
            gen = torch.Generator().manual_seed(cfg.distill.seed * 1_000_003 + b)
            with torch.no_grad():
                mean, std = batch_posterior(batch, parts.vae, cfg.data.vae_batch_size)
                cond = batch_cond(batch, parts, acc.device)
            for _ in range(P.targets_per_example):
                B = len(items)
                n = draw_indices(B, cfg.distill.grid_size, cfg.distill.index_scheme, gen)
                vae_eps = torch.randn(mean.shape, generator=gen)
                noise = torch.randn(mean.shape, generator=gen)
                x0 = mean.float().cpu() + (std.float().cpu() * vae_eps if cfg.data.vae_sample else 0.0)
                x_tn = add_noise(schedule, x0, grid[n].float(), noise).to(acc.device)
                with acc.autocast():
                    res = provider(x_tn, n.to(acc.device), cond)
                calls += res.calls
                rows["x_tn"].append(x_tn.cpu().to(store_dtype))
                rows["n"].append(n.cpu())
                rows["target"].append(res.value.float().cpu().to(store_dtype))
                for k in ("prompt_embeds", "text_embeds", "time_ids"):
                    rows[k].append(cond[k].float().cpu().to(store_dtype if k != "time_ids" else torch.float32))
        _write_shard(out, name, rows, skipped)
        bar.update(1)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_index(out, cfg, num_shards, len(dataset), time.perf_counter() - t0, calls)
    acc.wait_for_everyone()
    return out


def _write_shard(out: Path, name: str, rows: dict[str, list], skipped: int) -> None:
    from safetensors.torch import save_file

    if rows["n"]:
        tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
    else:  # every image of this shard was unreadable
        tensors = {"n": torch.zeros(0, dtype=torch.long)}
    tmp = out / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"count": str(tensors["n"].shape[0]), "skipped": str(skipped)})
    tmp.rename(out / name)


def _write_index(out: Path, cfg: SDXLTrainConfig, num_shards: int, num_rows: int, seconds: float, calls: int) -> None:
    from safetensors import safe_open

    shards, skipped_total = {}, 0
    for s in range(num_shards):
        name = f"targets-{s:05d}.safetensors"
        with safe_open(str(out / name), "pt") as fh:
            shards[name] = int(fh.metadata()["count"])
            skipped_total += int(fh.metadata().get("skipped", 0))
    index = {"complete": True, "shards": shards, "num_examples": num_rows - skipped_total,
             "skipped_unreadable": skipped_total, "targets_per_example": cfg.precompute.targets_per_example,
             "solver": cfg.distill.solver, "grid_size": cfg.distill.grid_size, "grid": cfg.distill.grid,
             "timestep_offset": cfg.model.timestep_offset, "mask_mode": cfg.distill.mask_mode,
             "guidance_scale": cfg.teacher.guidance_scale, "cfg_convention": cfg.teacher.cfg_convention,
             "uncond": cfg.teacher.uncond, "model": cfg.model.pretrained, "seed": cfg.distill.seed,
             "seconds": seconds, "teacher_calls_rank0": calls}
    (out / "index.json").write_text(json.dumps(index, indent=2))


def main(argv: Sequence[str] | None = None) -> Path:
    p = add_config_args(argparse.ArgumentParser(prog="python -m sdxl.precompute_targets",
                                                description="store Direct CD targets once"))
    args = p.parse_args(argv)
    cfg = load_train_config(args.config, overrides_from(args))
    if report_check(args, "sdxl.precompute_targets", cfg, door=lambda: door_checks(cfg, launch_world_size())):
        return None
    out = precompute(cfg, progress=cfg.progress)
    print(f"targets written to {out}")
    return out


if __name__ == "__main__":
    run_main(main)
