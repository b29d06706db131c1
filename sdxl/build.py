"""Building a distillation run: accelerator, weights, teacher / student / target / provider / optimizer.

Used by ``sdxl.train`` and ``sdxl.precompute_targets``. Nothing here checks the config: the checks
at the door (``sdxl.checks``) run first, before any model loads or any folder is made.

Randomness at build time: ``model.pretrained="tiny"`` is built (once, cached) before the run's seed
is set, and the seed is set right before anything drawn for the run (the LoRA's random ``A``), so a
run that had to build the tiny model and one that found it cached start from the same weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

from odecm.consistency import LCMBoundary
from odecm.grids import make_grid
from odecm.objectives import CDTarget, DirectCDTarget, PrecomputedTarget
from odecm.solvers import get_solver
from odecm.training import EMATarget, constant_with_warmup, make_optimizer

from .batches import BatchSource, batch_source
from .student import SDXLStudent, add_lora, full_student_unet
from .teacher import AdapterSwitch, adapter_switch, load_sdxl, make_teacher, resolve_dtype, schedule_from_scheduler_config
from .train_config import SDXLTrainConfig

__all__ = ["make_accelerator", "resolve_log_with", "resolve_pretrained", "apply_speed_options", "TeacherSide",
           "build_teacher_side", "Run", "build_run"]


def resolve_log_with(cfg: SDXLTrainConfig) -> str | None:
    """The accelerate tracker of ``cfg.log_with`` (``auto``: tensorboard when installed), or None (also
    for a named tracker that is not installed: ``sdxl.checks`` reports that one)."""
    import importlib.util

    name = "tensorboard" if cfg.log_with == "auto" else cfg.log_with
    if name == "none" or importlib.util.find_spec(name) is None:
        return None
    return name


def make_accelerator(cfg: SDXLTrainConfig, trackers: bool = False):
    """accelerate's ``Accelerator`` for ``cfg.speed.mixed_precision`` (and, with ``trackers``, the
    tracker of ``cfg.log_with`` logging under ``<out_dir>/tensorboard``). Making it creates no folder.

    fp16 uses a grad scaler starting at ``speed.fp16_init_scale``. accelerate makes none on CPU, so
    there it gets ``torch.amp.GradScaler("cpu")``: CPU runs take the same fp16 code path as GPUs. A
    second run in one process may use another precision (accelerate's process-wide state is reset)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradScalerKwargs

    mp = cfg.speed.mixed_precision
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mp):
        # accelerate keeps one state per process; a later run in the same process (tests, notebooks) may
        # ask for another precision. Reset that state only, never the process group (PartialState).
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [GradScalerKwargs(init_scale=cfg.speed.fp16_init_scale)] if mp == "fp16" else []
    log_with = resolve_log_with(cfg) if trackers else None
    acc = Accelerator(mixed_precision=mp, kwargs_handlers=handlers, log_with=log_with,
                      project_dir=cfg.out_dir if log_with else None)
    if mp == "fp16" and getattr(acc, "scaler", None) is None:
        acc.scaler, acc.native_amp = torch.amp.GradScaler(acc.device.type, init_scale=cfg.speed.fp16_init_scale), True
    return acc


def resolve_pretrained(cfg: SDXLTrainConfig, accelerator=None) -> str:
    """``model.pretrained``, where ``"tiny"`` is a tiny random SDXL built once into odecm's cache
    (``sdxl.tiny.cached_tiny_sdxl``; the main process builds, the others wait)."""
    if cfg.model.pretrained != "tiny":
        return cfg.model.pretrained
    from .tiny import cached_tiny_sdxl

    if accelerator is None or accelerator.is_main_process:
        cached_tiny_sdxl(seed=0)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return str(cached_tiny_sdxl(seed=0))


def apply_speed_options(unet: torch.nn.Module, cfg: SDXLTrainConfig, trainable: bool = True) -> None:
    """channels_last, attention kernel (SDPA or xformers), gradient checkpointing (trainable UNet only),
    torch.compile."""
    if cfg.speed.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.speed.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif cfg.speed.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if trainable and cfg.speed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.speed.compile:
        unet.compile()  # in place: module identity (and the adapter switch) kept


@dataclass
class TeacherSide:
    """The frozen half of a run: schedule, CFG teacher, grid and solver."""

    schedule: Any
    teacher: Any
    grid: torch.Tensor
    solver: Any
    prediction_type: str


def build_teacher_side(cfg: SDXLTrainConfig, parts, unet: torch.nn.Module, base_model: bool) -> TeacherSide:
    """Schedule (``model.timestep_offset`` indexing), the CFG teacher on ``unet`` (adapters off when
    ``base_model``), the ``distill.grid`` of size N and the ``distill.solver``."""
    schedule = schedule_from_scheduler_config(parts.scheduler_config, cfg.model.timestep_offset)
    prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    empty = parts.prompt_encoder()([""]) if cfg.teacher.uncond == "empty" else None
    teacher = make_teacher(unet, schedule, cfg.teacher.guidance_scale, cfg.teacher.cfg_convention, cfg.teacher.uncond,
                           empty_embeddings=empty, prediction_type=prediction_type, base_model=base_model)
    grid = make_grid(cfg.distill.grid, schedule, cfg.distill.grid_size)
    return TeacherSide(schedule, teacher, grid, get_solver(cfg.distill.solver), prediction_type)


def needs_text_encoders(cfg: SDXLTrainConfig) -> bool:
    return cfg.data.source in ("images", "synthetic") or cfg.teacher.uncond == "empty" or cfg.validation.every > 0


def needs_vae(cfg: SDXLTrainConfig) -> bool:
    return cfg.data.source in ("images", "synthetic") or cfg.validation.every > 0


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
    source: BatchSource
    student_fn: Callable = None  # the (possibly DDP-wrapped) student
    switch: AdapterSwitch | None = None  # the shared UNet's adapter state (LoRA students)

    @property
    def world(self) -> tuple[int, int]:
        return self.accelerator.process_index, self.accelerator.num_processes


def _copy_sharing_frozen(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose frozen parameters and buffers are the original's (an EMA target of a LoRA
    student duplicates only the adapters, not the 2.6 B frozen UNet weights)."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


def build_run(cfg: SDXLTrainConfig, accelerator=None) -> Run:
    """Load weights, build teacher / student / target / provider / optimizer and the batch source."""
    acc = accelerator or make_accelerator(cfg)
    device = acc.device
    if cfg.speed.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pretrained = resolve_pretrained(cfg, acc)  # may build the tiny model: before the seed
    torch.manual_seed(cfg.distill.seed)  # LoRA's random A (and anything else drawn at build time) is seeded
    parts = load_sdxl(pretrained, vae=cfg.model.vae, dtype=cfg.model.dtype, vae_dtype=cfg.model.vae_dtype,
                      device=device, text_encoders=needs_text_encoders(cfg), load_vae=needs_vae(cfg),
                      variant=cfg.model.variant, revision=cfg.model.revision)
    schedule = schedule_from_scheduler_config(parts.scheduler_config, cfg.model.timestep_offset)
    prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    boundary = LCMBoundary(cfg.student.sigma_data, cfg.student.timestep_scaling, t_min=0.0)
    s = cfg.student
    if s.kind == "lora":
        add_lora(parts.unet, s.lora_rank, s.lora_alpha, s.lora_target_modules, s.lora_dropout)
        student = SDXLStudent(parts.unet, schedule, "lora", boundary, prediction_type=prediction_type,
                              compute_dtype=resolve_dtype(cfg.model.dtype))
        apply_speed_options(parts.unet, cfg, trainable=True)
    else:
        unet = full_student_unet(parts.unet, s.w_embedding_dim).to(device)
        student = SDXLStudent(unet, schedule, "full", boundary, teacher_unet=parts.unet,
                              prediction_type=prediction_type, w_embedding_dim=s.w_embedding_dim,
                              guidance_scale=cfg.teacher.guidance_scale)
        apply_speed_options(unet, cfg, trainable=True)
        apply_speed_options(parts.unet, cfg, trainable=False)
    side = build_teacher_side(cfg, parts, student.teacher_unet, base_model=s.kind == "lora")
    trainable_names = {k for k, p in student.named_parameters() if p.requires_grad}
    target = EMATarget(student, cfg.distill.target.rate, params=lambda name: name in trainable_names,
                       copy_fn=_copy_sharing_frozen)
    if cfg.data.source == "targets":
        provider = PrecomputedTarget()
    elif cfg.distill.method == "cd":
        provider = CDTarget(side.teacher, side.solver, side.grid, target_fn=target)
    else:
        provider = DirectCDTarget(side.teacher, side.solver, side.grid, mask_mode=cfg.distill.mask_mode)
    o = cfg.distill.optim
    optimizer = make_optimizer(student.parameters(), o.name, o.lr, tuple(o.betas), o.weight_decay, o.eps)
    lr_scheduler = constant_with_warmup(optimizer, o.warmup_steps)  # stepped once per global step
    student_fn, optimizer = acc.prepare(student, optimizer)
    source = batch_source(cfg, parts, acc)
    switch = adapter_switch(parts.unet) if s.kind == "lora" else None
    return Run(cfg, acc, student, side.teacher, provider, side.grid, side.schedule, target, optimizer, lr_scheduler,
               parts, source, student_fn, switch)
