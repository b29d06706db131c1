"""Configuration of an SDXL distillation run (pydantic; unknown keys are errors naming the key).

``SDXLTrainConfig`` = the backend-agnostic ``odecm.config.DistillConfig`` (``distill``: method,
solver, N, grid, boundary, distance, index scheme, mask mode, target policy, optimiser, steps,
batch size, seed, checkpointing) plus the SDXL parts: ``model`` (weights), ``student`` (LoRA or
full UNet), ``teacher`` (CFG), ``data``, ``speed`` (precision and GPU options), ``precompute``
(Direct CD scheme (c)), ``validation`` (sample images during training) and ``log_with`` (trackers).

``RESUME_POLICY`` says what ``--resume`` may change (``odecm.runs``): nothing that defines the run
(method, solver, grid and indexing, seed, model, student, teacher, data, optimizer and learning
rate, precision) unless ``--allow-change KEY`` names it; a larger ``distill.train_steps``, the
checkpoint and logging frequency, worker counts, speed options, validation and trackers with a
logged note.

Direct CD schemes: (a) paper: ``distill.index_scheme=per_sample``, ``distill.mask_mode=full``
(solve from the batch's largest t_n, masking); (b) ``distill.index_scheme=shared`` (one t_n per
batch, no masking needed); (c) ``python -m sdxl.precompute_targets`` then ``data.source=targets``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from odecm.config import DistillConfig, StrictModel, load_config
from odecm.runs import ResumePolicy, grows

from .student import LORA_TARGET_MODULES
from .teacher import SDXL_BASE

__all__ = ["ModelConfig", "StudentConfig", "TeacherConfig", "DataConfig", "SpeedConfig", "PrecomputeConfig",
           "ValidationConfig", "SDXLTrainConfig", "load_train_config", "CONFIG_DIR", "RESUME_POLICY",
           "VALIDATION_PROMPTS"]

CONFIG_DIR = Path(__file__).parent / "configs"


class ModelConfig(StrictModel):
    """Where the teacher comes from. ``pretrained``: hub id or local folder (diffusers layout), or
    ``"tiny"`` = a tiny random SDXL-architecture model built under ``<out_dir>/tiny_sdxl`` (CPU smoke runs)."""

    pretrained: str = SDXL_BASE
    vae: str | None = Field(None, description="separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    revision: str | None = None
    variant: str | None = Field(None, description="'fp16' picks the hub's half-precision files")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="frozen weights (UNet base, text encoders)")
    vae_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="default fp32 (stock VAE overflows in fp16)")
    timestep_offset: Literal[0, 1] = Field(0, description="0 = diffusers indexing (UNet sees 0..999), 1 = paper's code")


class StudentConfig(StrictModel):
    kind: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGET_MODULES))
    w_embedding_dim: int | None = Field(None, ge=2, description="full student only: LCM guidance embedding size (256)")
    sigma_data: float = Field(0.5, gt=0, description="LCM boundary scalings")
    timestep_scaling: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _w_only_full(self):
        if self.w_embedding_dim is not None and self.kind != "full":
            raise ValueError("student.w_embedding_dim needs student.kind='full'")
        return self


class TeacherConfig(StrictModel):
    """``eps = eps_u + w (eps_c - eps_u)`` (imagen) or ``eps_c + w (eps_c - eps_u)`` (lcm)."""

    guidance_scale: float = Field(9.0, ge=0)
    cfg_convention: Literal["imagen", "lcm"] = "imagen"
    uncond: Literal["zeros", "empty"] = Field("zeros", description="zeroed text embeddings (paper) or the empty prompt's")


class DataConfig(StrictModel):
    """``images``: a folder (sidecar .txt) or .jsonl/.csv index (``sdxl.data``), VAE and text encoders
    run online; ``latent_cache``: a folder from ``python -m sdxl.latent_cache``; ``targets``: a folder
    from ``python -m sdxl.precompute_targets`` (Direct CD only); ``synthetic``: ``num_samples``
    generated captioned images (smoke runs)."""

    source: Literal["images", "latent_cache", "targets", "synthetic"] = "images"
    path: str | None = None
    index: str | None = None
    resolution: int = Field(1024, ge=8)
    crop: Literal["center", "random"] = "random"
    flip: bool = False
    num_workers: int = Field(4, ge=0)
    num_samples: int = Field(32, ge=1, description="synthetic source only")
    vae_sample: bool = Field(True, description="latent = posterior sample (True, as LCM) or mean")
    vae_batch_size: int = Field(4, ge=1, description="images per VAE encoder call (memory at 1024 px)")
    allow_empty_captions: bool = Field(False, description="images without a caption train with the empty prompt")
    max_skip_fraction: float | None = Field(
        0.2, ge=0, le=1, description="stop when more than this share of the samples read was unreadable (None: never)")

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self


class SpeedConfig(StrictModel):
    """Precision and GPU options. ``mixed_precision`` is accelerate's autocast for the whole step;
    trainable weights stay fp32. ``fp16`` goes through a grad scaler (accelerate's; on CPU a
    ``torch.amp.GradScaler("cpu")``) starting at ``fp16_init_scale``: an overflow step is skipped by the
    scaler, which lowers the scale, and is logged as ``skipped_overflow``."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    fp16_init_scale: float = Field(2.0 ** 16, gt=0, description="initial loss scale under fp16 (torch's default 2**16)")
    gradient_checkpointing: bool = True
    compile: bool = Field(False, description="torch.compile the UNet (first steps slow; fixed shapes help)")
    channels_last: bool = True
    allow_tf32: bool = True
    attention: Literal["sdpa", "xformers", "default"] = Field(
        "sdpa", description="sdpa = torch scaled_dot_product_attention; xformers needs the xformers package")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        """``--set speed.mixed_precision=no``: YAML reads a bare ``no`` as ``false``; it means "no"."""
        return "no" if v is False else v


class PrecomputeConfig(StrictModel):
    """``python -m sdxl.precompute_targets``: Direct CD targets stored once, reused by ``data.source=targets``."""

    out: str | None = Field(None, description="default: <out_dir>/targets")
    targets_per_example: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(256, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


#: fixed validation prompts (our own; the paper's script also samples four fixed prompts)
VALIDATION_PROMPTS = [
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up photo of a red fox in fresh snow",
    "an isometric illustration of a small city park",
    "a bowl of ramen on a wooden table, studio lighting",
]


class ValidationConfig(StrictModel):
    """Images sampled by the student every ``every`` steps (0: never) into
    ``<out_dir>/validation/step_XXXXXXX/k{k}_p{i}.png``: fixed prompts and fixed initial noise (from
    ``seed``), k-step consistency sampling at k evenly spaced skip-grid points (k = 1: ``t_N``;
    k = 4: ``t_N, t_{3N/4}, t_{N/2}, t_{N/4}``), as diffusers' LCM training scripts do. Needs the VAE
    and the text encoders (loaded for it when the data source does not need them)."""

    every: int = Field(0, ge=0, description="steps between validations; 0 = off")
    prompts: list[str] = Field(default_factory=lambda: list(VALIDATION_PROMPTS), min_length=1)
    steps: list[int] = Field(default_factory=lambda: [1, 4], min_length=1, description="k of k-step sampling")
    seed: int = 0
    resolution: int | None = Field(None, ge=8, description="default data.resolution")

    @model_validator(mode="after")
    def _steps(self):
        bad = [k for k in self.steps if isinstance(k, bool) or k < 1]
        if bad:
            raise ValueError(f"validation.steps={self.steps}: every k must be an integer >= 1")
        return self


class SDXLTrainConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig(source="synthetic")
    distill: DistillConfig = DistillConfig()
    speed: SpeedConfig = SpeedConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    out_dir: str = "runs/sdxl"
    log_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    progress: bool = True
    save_student: bool = Field(True, description="write the LoRA (diffusers format) or full UNet at the end")
    validation: ValidationConfig = ValidationConfig()
    log_with: Literal["auto", "none", "tensorboard", "wandb"] = Field(
        "auto", description="accelerate tracker; auto = tensorboard when installed, else none")

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.source == "targets" and self.distill.method != "direct_cd":
            raise ValueError("data.source='targets' (precomputed Direct CD targets) needs distill.method='direct_cd'")
        if self.distill.grid not in ("skip", "leading"):
            raise ValueError(f"distill.grid={self.distill.grid!r}: SDXL's discrete schedule uses allowed values ['skip', 'leading']")
        if self.distill.boundary != "lcm":
            raise ValueError("distill.boundary: allowed values ['lcm'] for SDXL (LCM scalings on the discrete timestep)")
        return self


#: what a resume may change (``odecm.runs.check_resume_config``; the longest matching prefix decides)
RESUME_POLICY = ResumePolicy(
    refuse=("model", "student", "teacher", "data", "distill", "precompute", "speed.mixed_precision"),
    note=("distill.train_steps", "distill.checkpoint_every", "distill.max_nonfinite", "data.num_workers",
          "data.vae_batch_size", "speed", "out_dir", "log_every", "keep_checkpoints", "progress", "save_student",
          "validation", "log_with"),
    conditions={"distill.train_steps": (grows, "distill.train_steps may only grow")},
    default="refuse",
)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SDXLTrainConfig:
    """Config file (YAML/JSON; a bare name like ``cd_ddim`` means ``sdxl/configs/cd_ddim.yaml``) + ``k=v`` overrides."""
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            path = CONFIG_DIR / f"{path}.yaml"
    return load_config(SDXLTrainConfig, path, overrides)
