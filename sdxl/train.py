"""SDXL consistency distillation (CD) and Direct CD through odecm's one core.

    python -m sdxl.train --config sdxl/configs/cd_ddim.yaml [--set distill.train_steps=10 ...] [--resume latest]
    accelerate launch --num_processes 8 -m sdxl.train --config ...          # several GPUs
    accelerate launch --cpu --num_processes 2 -m sdxl.train --config tiny_cpu  # two CPU processes

One training iteration (paper, Algorithm: LCM-LoRA-style CD on SDXL):

  1. data: a global batch of B images (or cached latents) with captions and crops; rank r of W
     processes takes the global slots r, r + W, ... (so W processes x B/W == 1 process x B);
  2. latents ``x_0`` (VAE posterior sample), cond = (prompt_embeds, text_embeds, time_ids);
  3. ``n ~ U{1..N}`` per sample (or shared), ``x_{t_n} = alpha x_0 + sigma eps`` on the skip grid;
  4. target: CD = one CFG-teacher solver step to ``t_{n-1}`` then the target (student under
     stop-gradient, or EMA); Direct CD = the teacher solver down to ``t_0`` (or a stored target);
  5. loss ``lambda(t_n) d(f_theta(x_{t_n}, t_n), target)`` (``odecm.objectives.consistency_loss``);
  6. backward, clip, AdamW step (``odecm.training.Trainer``: NaN guard, JSONL log, checkpoints).

All randomness (n, noise, VAE posterior noise) is drawn for the *global* batch from the Trainer's
generator, identically on every rank, and sliced; checkpoints store that generator, so ``--resume
latest`` continues the same stream and the data order restarts from the step count.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from odecm.cli import add_config_args, overrides_from, provenance, run_main
from odecm.config import save_config
from odecm.consistency import LCMBoundary
from odecm.grids import make_grid
from odecm.objectives import (CDTarget, DirectCDTarget, PrecomputedTarget, consistency_loss, draw_indices,
                              get_distance)
from odecm.solvers import get_solver
from odecm.training import EMATarget, Trainer, TrainerConfig, constant_with_warmup, make_optimizer

from .student import SDXLStudent, add_lora, full_student_unet
from .teacher import load_sdxl, make_teacher, make_time_ids, resolve_dtype, schedule_from_scheduler_config
from .train_config import SDXLTrainConfig, load_train_config

__all__ = ["Run", "build_run", "make_loss_fn", "train", "main", "parse_args", "apply_speed_options", "batch_source",
           "batch_posterior", "batch_cond", "BatchSource"]



# ----------------------------------------------------------------------------------------- setup
def make_accelerator(cfg: SDXLTrainConfig):
    from accelerate import Accelerator

    mp = cfg.speed.mixed_precision
    acc = Accelerator(mixed_precision=mp if torch.cuda.is_available() or mp == "no" else "no")
    return acc


def resolve_pretrained(cfg: SDXLTrainConfig, accelerator=None) -> str:
    """``model.pretrained="tiny"`` builds a tiny random SDXL under ``<out_dir>/tiny_sdxl`` once."""
    if cfg.model.pretrained != "tiny":
        return cfg.model.pretrained
    folder = Path(cfg.out_dir) / "tiny_sdxl"
    if accelerator is None or accelerator.is_main_process:
        if not (folder / "model_index.json").exists():
            from .tiny import build_tiny_sdxl

            build_tiny_sdxl(folder, seed=0)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return str(folder)


def apply_speed_options(unet: torch.nn.Module, cfg: SDXLTrainConfig, trainable: bool = True) -> None:
    """channels_last, SDPA attention, gradient checkpointing (trainable UNet only), torch.compile."""
    if cfg.speed.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.speed.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if trainable and cfg.speed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.speed.compile:
        unet.compile()  # in place: module identity (and peft's adapter toggles) kept


@dataclass
class Run:
    """Everything a training run holds (returned by ``build_run`` for tests and benchmarks)."""

    cfg: SDXLTrainConfig
    accelerator: Any
    student: SDXLStudent
    teacher: Any
    provider: Any
    grid: torch.Tensor
    schedule: Any
    target: EMATarget
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    parts: Any
    source: "BatchSource"
    student_fn: Callable = None  # the (possibly DDP-wrapped) student

    @property
    def world(self) -> tuple[int, int]:
        return self.accelerator.process_index, self.accelerator.num_processes


def build_run(cfg: SDXLTrainConfig, accelerator=None) -> Run:
    """Load weights, build teacher / student / target / provider / optimizer and the batch source."""
    acc = accelerator or make_accelerator(cfg)
    device = acc.device
    if cfg.speed.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.distill.batch_size % acc.num_processes:
        raise ValueError(f"distill.batch_size={cfg.distill.batch_size} must be divisible by the "
                         f"{acc.num_processes} processes (it is the global batch)")
    src = cfg.data.source
    need_text = src in ("images", "synthetic") or cfg.teacher.uncond == "empty"
    need_vae = src in ("images", "synthetic")
    torch.manual_seed(cfg.distill.seed)  # LoRA's random A (and anything else drawn at build time) is seeded
    parts = load_sdxl(resolve_pretrained(cfg, acc), vae=cfg.model.vae, dtype=cfg.model.dtype,
                      vae_dtype=cfg.model.vae_dtype, device=device, text_encoders=need_text, load_vae=need_vae,
                      variant=cfg.model.variant, revision=cfg.model.revision)
    schedule = schedule_from_scheduler_config(parts.scheduler_config, cfg.model.timestep_offset)
    prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    boundary = LCMBoundary(cfg.student.sigma_data, cfg.student.timestep_scaling, t_min=0.0)
    compute_dtype = resolve_dtype(cfg.model.dtype)
    s = cfg.student
    if s.kind == "lora":
        add_lora(parts.unet, s.lora_rank, s.lora_alpha, s.lora_target_modules, s.lora_dropout)
        student = SDXLStudent(parts.unet, schedule, "lora", boundary, prediction_type=prediction_type,
                              compute_dtype=compute_dtype)
        apply_speed_options(parts.unet, cfg, trainable=True)
    else:
        unet = full_student_unet(parts.unet, s.w_embedding_dim).to(device)
        student = SDXLStudent(unet, schedule, "full", boundary, teacher_unet=parts.unet,
                              prediction_type=prediction_type, w_embedding_dim=s.w_embedding_dim,
                              guidance_scale=cfg.teacher.guidance_scale)
        apply_speed_options(unet, cfg, trainable=True)
        apply_speed_options(parts.unet, cfg, trainable=False)
    empty = None
    if cfg.teacher.uncond == "empty":
        empty = parts.prompt_encoder()([""])
    teacher = make_teacher(student.teacher_unet, schedule, cfg.teacher.guidance_scale, cfg.teacher.cfg_convention,
                           cfg.teacher.uncond, empty_embeddings=empty, prediction_type=prediction_type,
                           base_model=s.kind == "lora")
    grid = make_grid(cfg.distill.grid, schedule, cfg.distill.grid_size)
    solver = get_solver(cfg.distill.solver)
    trainable_names = {k for k, p in student.named_parameters() if p.requires_grad}
    target = EMATarget(student, cfg.distill.target.rate, params=lambda name: name in trainable_names)
    if src == "targets":
        provider = PrecomputedTarget()
    elif cfg.distill.method == "cd":
        provider = CDTarget(teacher, solver, grid, target_fn=target)
    else:
        provider = DirectCDTarget(teacher, solver, grid, mask_mode=cfg.distill.mask_mode)
    o = cfg.distill.optim
    optimizer = make_optimizer(student.parameters(), o.name, o.lr, tuple(o.betas), o.weight_decay, o.eps)
    lr_scheduler = constant_with_warmup(optimizer, o.warmup_steps)  # stepped once per global step
    student_fn, optimizer = acc.prepare(student, optimizer)
    source = batch_source(cfg, parts, acc)
    return Run(cfg, acc, student, teacher, provider, grid, schedule, target, optimizer, lr_scheduler, parts,
               source, student_fn)


# ----------------------------------------------------------------------------------------- data
class BatchSource:
    """``get(step)`` -> this rank's samples of global step ``step`` (dict, global slots r::W)."""

    def __init__(self, dataset, collate, local_batch: int, seed: int, rank: int, world: int, num_workers: int = 0):
        from sdxl.data import ShardedSampler

        self.dataset, self.collate, self.local_batch = dataset, collate, local_batch
        self.sampler = ShardedSampler(len(dataset), seed=seed, shuffle=True, rank=rank, world_size=world,
                                      with_epoch=True)
        self.num_workers = num_workers
        self._iter: Iterator | None = None
        self._next_step: int | None = None
        per_epoch = self.sampler.per_rank // local_batch
        if per_epoch == 0:
            raise ValueError(f"the dataset ({len(dataset)} samples) is smaller than one batch per process ({local_batch})")
        self.per_epoch = per_epoch

    def _loader(self, step: int) -> Iterator:
        from torch.utils.data import DataLoader

        self.sampler.resume(step, self.local_batch)
        while True:
            loader = DataLoader(self.dataset, batch_size=self.local_batch, sampler=self.sampler,
                                collate_fn=self.collate, num_workers=self.num_workers, drop_last=True)
            yield from loader
            self.sampler.set_epoch(self.sampler.epoch + 1, 0)

    def get(self, step: int) -> dict:
        if self._iter is None or self._next_step != step:
            self._iter = self._loader(step)
        self._next_step = step + 1
        return next(self._iter)


def batch_source(cfg: SDXLTrainConfig, parts, accelerator) -> BatchSource:
    d = cfg.data
    rank, world = accelerator.process_index, accelerator.num_processes
    local = cfg.distill.batch_size // world
    if d.source in ("images", "synthetic"):
        from sdxl.data import ImageCaptionDataset, collate, make_synthetic_dataset

        folder = d.path
        if d.source == "synthetic":
            folder = Path(cfg.out_dir) / "synthetic_data"
            if accelerator.is_main_process and not any(folder.glob("*.txt")):
                make_synthetic_dataset(folder, d.num_samples, size=d.resolution, seed=cfg.distill.seed)
            accelerator.wait_for_everyone()
        ds = ImageCaptionDataset.from_folder(folder, d.index, resolution=d.resolution, crop=d.crop, flip=d.flip,
                                             seed=cfg.distill.seed)
        return BatchSource(ds, collate, local, cfg.distill.seed, rank, world, d.num_workers)
    if d.source == "latent_cache":
        from sdxl.latent_cache import CachedLatentDataset, collate_cached

        return BatchSource(CachedLatentDataset(d.path), collate_cached, local, cfg.distill.seed, rank, world,
                           d.num_workers)
    from .precompute_targets import TargetDataset, collate_targets

    return BatchSource(TargetDataset(d.path), collate_targets, local, cfg.distill.seed, rank, world, d.num_workers)


def batch_posterior(batch: dict, vae=None, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the scaled VAE posterior: read from a latent-cache batch, or encoded from an
    image batch ``chunk`` images at a time (the VAE encoder's activations at 1024 px are large)."""
    if "latent_mean" in batch:
        return batch["latent_mean"], batch["latent_std"]
    from sdxl.latent_cache import encode_posterior

    pixels = batch["pixel_values"]
    with torch.no_grad(), torch.autocast(vae.device.type, enabled=False):  # the VAE keeps its own dtype
        out = [encode_posterior(vae, pixels[i:i + chunk]) for i in range(0, pixels.shape[0], chunk)]
    return torch.cat([m for m, _ in out]), torch.cat([s for _, s in out])


def batch_cond(batch: dict, parts, device) -> dict:
    """The cond dict of a batch: stored embeddings, or both text encoders on the captions with
    time_ids from the recorded original sizes and crops."""
    if "prompt_embeds" in batch:
        return {k: batch[k].to(device=device, dtype=torch.float32) for k in ("prompt_embeds", "text_embeds", "time_ids")}
    b = len(batch["caption"])
    time_ids = make_time_ids(b, batch["original_size"], batch["crop_top_left"], batch["target_size"], device=device)
    return parts.prompt_encoder().cond(batch["caption"], time_ids)


# ----------------------------------------------------------------------------------------- loss
def make_loss_fn(run: Run) -> Callable[[int, torch.Generator], dict]:
    """``loss_fn(step, generator)`` for ``odecm.training.Trainer`` (recipe in the module docstring)."""
    cfg, acc = run.cfg, run.accelerator
    d = cfg.distill
    rank, world = run.world
    B, device = d.batch_size, acc.device
    distance = get_distance(d.distance, c=d.huber_c) if d.distance == "pseudo_huber" else get_distance(d.distance)

    def loss_fn(step: int, generator: torch.Generator) -> dict:
        batch = run.source.get(step)
        mine = slice(rank, B, world)
        if cfg.data.source == "targets":  # scheme (c): stored (x_tn, n, endpoint)
            n = batch["n"].long().to(device)
            terms = consistency_loss(run.student_fn, run.provider, None, n, run.grid, run.schedule,
                                     cond=batch_cond(batch, run.parts, device), x_tn=batch["x_tn"].float().to(device),
                                     target=batch["target"].float().to(device), distance=distance,
                                     weighting=d.weighting)
        else:
            n = draw_indices(B, d.grid_size, d.index_scheme, generator)[mine].to(device)
            mean, std = batch_posterior(batch, run.parts.vae, cfg.data.vae_batch_size)
            shape = (B, *mean.shape[1:])
            vae_eps = torch.randn(shape, generator=generator)[mine].to(device)
            noise = torch.randn(shape, generator=generator)[mine].to(device)
            x0 = mean.float().to(device) + (std.float().to(device) * vae_eps if cfg.data.vae_sample else 0.0)
            cond = batch_cond(batch, run.parts, device)
            terms = consistency_loss(run.student_fn, run.provider, x0, n, run.grid, run.schedule, cond=cond,
                                     noise=noise, distance=distance, weighting=d.weighting)
        weighted = (terms["per_sample"] * terms["weights"]).detach()
        all_weighted = acc.gather(weighted) if world > 1 else weighted
        all_n = acc.gather(n) if world > 1 else n
        return {
            "loss": terms["loss"],
            "loss_global": float(all_weighted.mean()),
            "distance": terms["distance"],
            "target_calls": terms["target_calls"],
            "target_evals": terms["target_evals"],
            "target_steps": terms["target_steps"],
            "n_mean": float(all_n.float().mean()),
            "n_max": int(all_n.max()),
        }

    return loss_fn


# ----------------------------------------------------------------------------------------- main
def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def train(cfg: SDXLTrainConfig, resume: str | None = None, accelerator=None) -> dict:
    """Run (or resume) a distillation; returns the metrics written to ``<out_dir>/metrics.json``."""
    out = Path(cfg.out_dir)
    run = build_run(cfg, accelerator)
    acc = run.accelerator
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json", provenance=provenance())
    d = cfg.distill
    tcfg = TrainerConfig(steps=d.train_steps, grad_clip=d.optim.grad_clip, log_every=cfg.log_every,
                         checkpoint_every=d.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                         max_nonfinite=d.max_nonfinite, seed=d.seed, progress=cfg.progress)
    trainer = Trainer(run.student_fn, run.optimizer, make_loss_fn(run), out, tcfg, target=run.target,
                      lr_scheduler=run.lr_scheduler, accelerator=acc, student_state=_trainable_state,
                      params=run.student.parameters(),
                      run_info={"world_size": acc.num_processes, "method": d.method, "solver": d.solver})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    start = latest_step(out) if resume == "latest" else 0
    history = trainer.run(resume=resume)
    wall = time.perf_counter() - t0
    acc.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if acc.is_main_process:
        done = [h for h in history if "loss" in h]
        secs = [h["time_s"] for h in done[1:]] or [h["time_s"] for h in done]  # first step includes warm-up
        s_it = sum(secs) / max(len(secs), 1)
        metrics = {
            "steps": trainer.step,
            "steps_this_run": len(done),
            "resumed_from_step": start,
            "final_loss": done[-1]["loss_global"] if done else None,
            "mean_loss": sum(h["loss_global"] for h in done) / len(done) if done else None,
            "seconds_per_iteration": s_it,
            "images_per_second": d.batch_size / s_it if s_it > 0 else None,
            "mean_teacher_calls_per_iteration": sum(h["target_calls"] for h in done) / max(len(done), 1),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "wall_seconds": wall,
            "world_size": acc.num_processes,
            "device": str(acc.device),
        }
        if cfg.save_student:
            run.student.save(out / ("lora" if run.student.kind == "lora" else "student"))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.wait_for_everyone()
    return metrics


def latest_step(out_dir: Path) -> int:
    from odecm.training import latest_checkpoint

    ck = latest_checkpoint(out_dir)
    return int(ck.name.split("_")[-1]) if ck is not None else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdxl.train", description="SDXL CD / Direct CD distillation")
    add_config_args(p, "YAML/JSON file or a name in sdxl/configs (cd_ddim, direct_cd_heun, tiny_cpu ...)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_train_config(args.config, overrides_from(args))
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    run_main(main)
