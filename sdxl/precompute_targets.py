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
rank r taking batches b = r, r + W, ...). A rerun skips finished shards. Training with
``data.source=targets`` draws nothing: the same (x_tn, n, endpoint) pairs are reused every epoch,
which is the difference between scheme (c) and online Direct CD.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from odecm.objectives import DirectCDTarget, add_noise, draw_indices

__all__ = ["TargetDataset", "collate_targets", "precompute", "main", "TARGET_KEYS"]

TARGET_KEYS = ("x_tn", "n", "target", "prompt_embeds", "text_embeds", "time_ids")


class TargetDataset(Dataset):
    """Map-style dataset over a finished ``precompute_targets`` folder: ``ds[i]`` -> dict of
    ``TARGET_KEYS`` tensors (float32; ``n`` int64) and ``index``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{self.folder} holds no index.json: run python -m sdxl.precompute_targets first")
        self.index = json.loads(index_file.read_text())
        if not self.index.get("complete"):
            raise ValueError(f"precomputed targets in {self.folder} are incomplete; rerun python -m sdxl.precompute_targets")
        self.files = sorted(self.index["shards"])
        counts = [self.index["shards"][f] for f in self.files]
        self.offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
        self._handles: dict = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, key) -> dict:
        i = int(key[0] if isinstance(key, tuple) else key)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = max(j for j in range(len(self.files)) if self.offsets[j] <= i)
        file = self.files[s]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        h = self._handles[file]
        row = i - self.offsets[s]
        item = {k: h.get_slice(k)[row] for k in TARGET_KEYS}
        item = {k: (v.long() if k == "n" else v.float()) for k, v in item.items()}
        item["index"] = i
        return item


def collate_targets(items: Sequence[dict]) -> dict:
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in TARGET_KEYS}
    batch["index"] = [it["index"] for it in items]
    return batch


def precompute(cfg, accelerator=None, progress: bool = True) -> Path:
    """Compute and store Direct CD targets for every example of ``cfg.data`` (see module docstring)."""
    from tqdm.auto import tqdm

    from .train import apply_speed_options, batch_cond, batch_posterior, batch_source, make_accelerator, resolve_pretrained
    from .train_config import SDXLTrainConfig
    from .teacher import load_sdxl, make_teacher, resolve_dtype, schedule_from_scheduler_config
    from odecm.grids import make_grid
    from odecm.solvers import get_solver

    assert isinstance(cfg, SDXLTrainConfig)
    if cfg.data.source == "targets":
        raise ValueError("data.source='targets' is the output of this command; point data at images or a latent cache")
    acc = accelerator or make_accelerator(cfg)
    out = Path(cfg.precompute.out or Path(cfg.out_dir) / "targets")
    src = cfg.data.source
    need_text = src in ("images", "synthetic") or cfg.teacher.uncond == "empty"
    parts = load_sdxl(resolve_pretrained(cfg, acc), vae=cfg.model.vae, dtype=cfg.model.dtype,
                      vae_dtype=cfg.model.vae_dtype, device=acc.device, text_encoders=need_text,
                      load_vae=src in ("images", "synthetic"), variant=cfg.model.variant, revision=cfg.model.revision)
    apply_speed_options(parts.unet, cfg, trainable=False)
    schedule = schedule_from_scheduler_config(parts.scheduler_config, cfg.model.timestep_offset)
    empty = parts.prompt_encoder()([""]) if cfg.teacher.uncond == "empty" else None
    teacher = make_teacher(parts.unet, schedule, cfg.teacher.guidance_scale, cfg.teacher.cfg_convention,
                           cfg.teacher.uncond, empty_embeddings=empty,
                           prediction_type=parts.scheduler_config.get("prediction_type", "epsilon"))
    grid = make_grid(cfg.distill.grid, schedule, cfg.distill.grid_size)
    provider = DirectCDTarget(teacher, get_solver(cfg.distill.solver), grid, mask_mode=cfg.distill.mask_mode)

    # dataset in fixed order (no shuffling); the same loaders as training
    class _Shim:  # batch_source needs process info only
        process_index, num_processes, is_main_process = 0, 1, acc.is_main_process

        @staticmethod
        def wait_for_everyone():
            acc.wait_for_everyone()

    loader = batch_source(cfg, parts, _Shim())
    dataset, collate = loader.dataset, loader.collate
    P = cfg.precompute
    store_dtype = resolve_dtype(P.dtype)
    num_batches = (len(dataset) + P.batch_size - 1) // P.batch_size
    per_shard = max(1, P.shard_size // (P.batch_size * P.targets_per_example))
    num_shards = (num_batches + per_shard - 1) // per_shard
    out.mkdir(parents=True, exist_ok=True)
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
                t_n = grid[n].float()
                x_tn = add_noise(schedule, x0, t_n, noise).to(acc.device)
                with acc.autocast():
                    res = provider(x_tn, n.to(acc.device), cond)
                calls += res.calls
                rows["x_tn"].append(x_tn.cpu().to(store_dtype))
                rows["n"].append(n.cpu())
                rows["target"].append(res.value.float().cpu().to(store_dtype))
                for k in ("prompt_embeds", "text_embeds", "time_ids"):
                    rows[k].append(cond[k].float().cpu().to(store_dtype if k != "time_ids" else torch.float32))
        if rows["n"]:
            tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
        else:  # every image of this shard was unreadable
            tensors = {"n": torch.zeros(0, dtype=torch.long)}
        tmp = out / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"count": str(tensors["n"].shape[0]), "skipped": str(skipped)})
        tmp.rename(out / name)
        bar.update(1)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        shards, skipped_total = {}, 0
        for s in range(num_shards):
            name = f"targets-{s:05d}.safetensors"
            with safe_open(str(out / name), "pt") as fh:
                shards[name] = int(fh.metadata()["count"])
                skipped_total += int(fh.metadata().get("skipped", 0))
        index = {"complete": True, "shards": shards, "num_examples": len(dataset) - skipped_total,
                 "skipped_unreadable": skipped_total,
                 "targets_per_example": P.targets_per_example, "solver": cfg.distill.solver,
                 "grid_size": cfg.distill.grid_size, "mask_mode": cfg.distill.mask_mode,
                 "guidance_scale": cfg.teacher.guidance_scale, "cfg_convention": cfg.teacher.cfg_convention,
                 "uncond": cfg.teacher.uncond, "model": cfg.model.pretrained, "seed": cfg.distill.seed,
                 "seconds": time.perf_counter() - t0, "teacher_calls_rank0": calls}
        (out / "index.json").write_text(json.dumps(index, indent=2))
    acc.wait_for_everyone()
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    from .train_config import load_train_config

    from odecm.cli import add_config_args, overrides_from

    p = add_config_args(argparse.ArgumentParser(prog="python -m sdxl.precompute_targets",
                                                description="store Direct CD targets once"))
    args = p.parse_args(argv)
    cfg = load_train_config(args.config, overrides_from(args))
    out = precompute(cfg, progress=cfg.progress)
    print(f"targets written to {out}")
    return out


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
