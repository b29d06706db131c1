"""Configuration of an SDXL distillation run (pydantic; unknown keys are errors naming the key).

``SDXLTrainConfig`` = the backend-agnostic ``odecm.config.DistillConfig`` (``distill``: method,
solver, N, grid, boundary, distance, index scheme, mask mode, target policy, optimiser, steps,
batch size, seed, checkpointing) plus the SDXL parts: ``model`` (weights), ``student`` (LoRA or
full UNet), ``teacher`` (CFG), ``data``, ``speed`` (precision and GPU options) and ``precompute``
(Direct CD scheme (c)).

Direct CD schemes: (a) paper: ``distill.index_scheme=per_sample``, ``distill.mask_mode=full``
(solve from the batch's largest t_n, masking); (b) ``distill.index_scheme=shared`` (one t_n per
batch, no masking needed); (c) ``python -m sdxl.precompute_targets`` then ``data.source=targets``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from odecm.config import DistillConfig, StrictModel, load_config

from .student import LORA_TARGET_MODULES
from .teacher import SDXL_BASE

__all__ = ["ModelConfig", "StudentConfig", "TeacherConfig", "DataConfig", "SpeedConfig", "PrecomputeConfig",
           "SDXLTrainConfig", "load_train_config", "CONFIG_DIR"]

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

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        return self


class SpeedConfig(StrictModel):
    """GPU options. ``mixed_precision`` is accelerate's autocast for the whole step (bf16 on GPUs);
    trainable weights stay fp32."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = True
    compile: bool = Field(False, description="torch.compile the UNet (first steps slow; fixed shapes help)")
    channels_last: bool = True
    allow_tf32: bool = True
    attention: Literal["sdpa", "default"] = Field("sdpa", description="sdpa = torch scaled_dot_product_attention")


class PrecomputeConfig(StrictModel):
    """``python -m sdxl.precompute_targets``: Direct CD targets stored once, reused by ``data.source=targets``."""

    out: str | None = Field(None, description="default: <out_dir>/targets")
    targets_per_example: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(256, ge=1)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


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

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.source == "targets" and self.distill.method != "direct_cd":
            raise ValueError("data.source='targets' (precomputed Direct CD targets) needs distill.method='direct_cd'")
        if self.distill.grid not in ("skip", "leading"):
            raise ValueError(f"distill.grid={self.distill.grid!r}: SDXL's discrete schedule uses allowed values ['skip', 'leading']")
        if self.distill.boundary != "lcm":
            raise ValueError("distill.boundary: allowed values ['lcm'] for SDXL (LCM scalings on the discrete timestep)")
        return self


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SDXLTrainConfig:
    """Config file (YAML/JSON; a bare name like ``cd_ddim`` means ``sdxl/configs/cd_ddim.yaml``) + ``k=v`` overrides."""
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            path = CONFIG_DIR / f"{path}.yaml"
    return load_config(SDXLTrainConfig, path, overrides)
