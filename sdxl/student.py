"""The SDXL student: a consistency function on top of the SDXL UNet.

``f_theta(x, t, cond) = c_skip(t) x + c_out(t) x0_hat_theta(x, t, cond)`` (``odecm.consistency``;
LCM boundary by default: ``sigma_data = 0.5``, timestep scaling 10, so ``f(x, 0) = x``), where
``x0_hat_theta = (x - sigma(t) eps_theta) / alpha(t)`` from the UNet's eps prediction.

Two kinds:

* ``"lora"`` (the paper, LCM-LoRA): peft LoRA adapters on the teacher's UNet
  (``unet.add_adapter(LoraConfig(r, lora_alpha, target_modules))``). The teacher is the *same*
  UNet with adapters off (``sdxl.teacher.AdapterSwitch``, switched lazily): one copy of the weights.
  LoRA weights are kept in fp32 while the frozen base can be bf16/fp16.
* ``"full"``: a trainable copy of the whole UNet (the teacher keeps its own frozen copy),
  optionally guidance-conditioned through a ``w`` embedding (``time_cond_proj_dim``; LCM's
  sinusoidal embedding of ``w``, fed as ``timestep_cond``).

Saving: ``save_lora`` writes diffusers' LoRA format, so a stock ``StableDiffusionXLPipeline`` +
``load_lora_weights`` + ``LCMScheduler`` samples from the student (``load_student_pipeline``, which
sets ``original_inference_steps`` to the training grid size from ``odecm_student.json``).
``load_student`` rebuilds the odecm consistency function from a saved run (for ODE-error work).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from odecm.consistency import Boundary, ConsistencyFunction, LCMBoundary
from odecm.denoisers import Denoiser
from odecm.schedules import DiscreteSchedule

from .teacher import SDXL_BASE, load_sdxl, make_teacher, resolve_dtype, sdxl_denoiser

Tensor = torch.Tensor

__all__ = [
    "LORA_TARGET_MODULES",
    "add_lora",
    "lora_state_dict",
    "save_lora",
    "guidance_scale_embedding",
    "full_student_unet",
    "SDXLStudent",
    "load_student",
    "load_student_pipeline",
    "write_student_info",
    "read_student_info",
    "STUDENT_INFO",
]

#: The paper's / LCM-LoRA's LoRA targets: attention, feed-forward, resnet convs, up/down-sampler
#: convs and time-embedding projections (peft matches module-name suffixes).
LORA_TARGET_MODULES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def add_lora(unet: nn.Module, rank: int = 64, alpha: float = 64, target_modules: Sequence[str] = LORA_TARGET_MODULES,
             dropout: float = 0.0, init: str | bool = True) -> nn.Module:
    """Attach one LoRA adapter (``W x + (alpha / r) B A x``, ``B = 0`` at init so the student starts
    as the teacher) and make only it trainable, in fp32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        init_lora_weights=init)
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in diffusers' LoRA naming (what ``save_lora_weights`` stores)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers format, with the LoRA config as
    adapter metadata so ``alpha != r`` round-trips). Load it with ``pipe.load_lora_weights(folder)``."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = lora_state_dict(unet)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    cfg = unet.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=sd, unet_lora_adapter_metadata=cfg)
    return folder


def guidance_scale_embedding(w: Tensor, dim: int = 256) -> Tensor:
    """LCM's w embedding: sinusoidal features of ``1000 w`` (``[sin, cos]`` of ``1000 w * 10000^(-k/(d/2-1))``)."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def full_student_unet(teacher_unet: nn.Module, w_embedding_dim: int | None = None) -> nn.Module:
    """A trainable fp32 copy of the teacher's UNet; with ``w_embedding_dim`` the copy gets a
    ``time_cond_proj_dim`` input (new zero-initialised projection) for a guidance embedding."""
    if w_embedding_dim is None:
        unet = copy.deepcopy(teacher_unet)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=int(w_embedding_dim))
        missing, unexpected = unet.load_state_dict(teacher_unet.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        nn.init.zeros_(unet.time_embedding.cond_proj.weight)  # starts as the teacher
    unet = unet.float()
    unet.requires_grad_(True).train()
    return unet


class SDXLStudent(nn.Module):
    """``student(x, t, cond) -> f_theta(x, t, cond)`` (a tensor like ``x``).

    ``kind="lora"``: ``unet`` carries the adapters; ``teacher()`` runs the same UNet with them
    disabled. ``kind="full"``: ``unet`` is the trainable copy and ``teacher_unet`` the frozen one.
    ``w_embedding_dim``: the UNet takes LCM's guidance embedding of ``cond["w"]`` (or of the fixed
    ``guidance_scale`` when cond has no ``"w"``)."""

    def __init__(self, unet: nn.Module, schedule: DiscreteSchedule, kind: Literal["lora", "full"] = "lora",
                 boundary: Boundary | None = None, teacher_unet: nn.Module | None = None,
                 prediction_type: str = "epsilon", w_embedding_dim: int | None = None, guidance_scale: float = 9.0,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if kind not in ("lora", "full"):
            raise ValueError(f"student kind={kind!r}; allowed: 'lora', 'full'")
        if kind == "full" and teacher_unet is None:
            raise ValueError("a full student needs the frozen teacher_unet")
        self.kind, self.schedule, self.prediction_type = kind, schedule, prediction_type
        self.boundary = boundary or LCMBoundary()
        self.w_embedding_dim, self.guidance_scale = w_embedding_dim, guidance_scale
        self.unet = unet
        # the frozen teacher copy of a full student is not a submodule: DDP and checkpoints skip it
        self._teacher_unet = [teacher_unet] if teacher_unet is not None else []
        timestep_cond = self._w_embedding if w_embedding_dim else None
        self.function = ConsistencyFunction(
            sdxl_denoiser(unet, schedule, prediction_type, timestep_cond=timestep_cond), self.boundary)
        if compute_dtype is not None:
            self.function.denoiser.model.compute_dtype = compute_dtype

    def _w_embedding(self, t: Tensor, cond: dict) -> Tensor:
        w = cond["w"] if isinstance(cond, dict) and "w" in cond else torch.full((t.shape[0],), self.guidance_scale)
        return guidance_scale_embedding(w.to(t.device), self.w_embedding_dim)

    def __deepcopy__(self, memo):
        """Copies (e.g. an EMA target) share the frozen teacher UNet of a full student instead of copying it."""
        for t in self._teacher_unet:
            memo[id(t)] = t
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    @property
    def teacher_unet(self) -> nn.Module:
        return self.unet if self.kind == "lora" else self._teacher_unet[0]

    def forward(self, x: Tensor, t: Any, cond: Any = None) -> Tensor:
        return self.function(x, t, cond)

    def teacher(self, guidance_scale: float = 9.0, convention: str = "imagen", uncond: str = "zeros",
                **kwargs) -> Denoiser:
        """The CFG teacher on the frozen weights (adapters disabled for a LoRA student)."""
        return make_teacher(self.teacher_unet, self.schedule, guidance_scale, convention, uncond,
                            prediction_type=self.prediction_type, base_model=self.kind == "lora", **kwargs)

    def trainable_state(self) -> dict[str, Tensor]:
        """Trainable tensors by name (LoRA weights, or the full UNet): what checkpoints store."""
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def save(self, folder: str | Path) -> Path:
        """LoRA: diffusers LoRA folder; full: ``save_pretrained`` UNet folder (``unet/``)."""
        folder = Path(folder)
        if self.kind == "lora":
            return save_lora(self.unet, folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        return folder


def _load_lora_into(unet: nn.Module, weights: str | Path) -> None:
    path = Path(weights)
    folder, name = (path.parent, path.name) if path.is_file() else (path, "pytorch_lora_weights.safetensors")
    unet.load_lora_adapter(str(folder), weight_name=name, prefix="unet", adapter_name="default")


def load_student(
    model: str = SDXL_BASE,
    weights: str | Path | None = None,
    kind: Literal["lora", "full"] = "lora",
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    timestep_offset: int = 0,
    boundary: Boundary | None = None,
    w_embedding_dim: int | None = None,
) -> SDXLStudent:
    """Rebuild a trained student as an odecm consistency function (and its teacher via ``.teacher()``).

    ``weights``: a LoRA folder/file written by ``save_lora`` (kind "lora") or a folder holding a
    ``unet/`` written by ``SDXLStudent.save`` (kind "full"). Text encoders and VAE are not loaded;
    use ``sdxl.teacher.load_sdxl`` for those."""
    from .teacher import schedule_from_scheduler_config

    parts = load_sdxl(model, dtype=dtype, device=device, text_encoders=False, load_vae=False)
    schedule = schedule_from_scheduler_config(parts.scheduler_config, timestep_offset)
    prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
    if kind == "lora":
        if weights is not None:
            _load_lora_into(parts.unet, weights)
        parts.unet.requires_grad_(False)
        return SDXLStudent(parts.unet, schedule, "lora", boundary, prediction_type=prediction_type)
    if kind != "full":
        raise ValueError(f"kind={kind!r}; allowed: 'lora', 'full'")
    from diffusers import UNet2DConditionModel

    if weights is None:
        raise ValueError("a full student needs weights=<folder with unet/>")
    unet = UNet2DConditionModel.from_pretrained(Path(weights) / "unet", torch_dtype=resolve_dtype(dtype)).to(device)
    unet.requires_grad_(False).eval()
    w_dim = w_embedding_dim if w_embedding_dim is not None else unet.config.get("time_cond_proj_dim")
    return SDXLStudent(unet, schedule, "full", boundary, teacher_unet=parts.unet, prediction_type=prediction_type,
                       w_embedding_dim=w_dim)


#: file next to a saved student describing how it was trained (``write_student_info``)
STUDENT_INFO = "odecm_student.json"


def write_student_info(folder: str | Path, cfg) -> Path:
    """``folder/odecm_student.json``: the training facts a sampler needs (grid size N, timestep indexing,
    boundary scalings, student kind, method, solver, teacher guidance) from a ``SDXLTrainConfig``."""
    info = {"grid_size": cfg.distill.grid_size, "grid": cfg.distill.grid, "timestep_offset": cfg.model.timestep_offset,
            "kind": cfg.student.kind, "sigma_data": cfg.student.sigma_data,
            "timestep_scaling": cfg.student.timestep_scaling, "method": cfg.distill.method, "solver": cfg.distill.solver,
            "guidance_scale": cfg.teacher.guidance_scale, "cfg_convention": cfg.teacher.cfg_convention,
            "uncond": getattr(cfg.teacher, "uncond", "zeros"), "model": cfg.model.pretrained}
    path = Path(folder) / STUDENT_INFO
    path.write_text(json.dumps(info, indent=2))
    return path


def read_student_info(weights: str | Path | None) -> dict:
    """The ``odecm_student.json`` next to a saved student (in its folder, or its run folder's
    ``config.json``), or {} when there is none."""
    if weights is None:
        return {}
    folder = Path(weights)
    folder = folder.parent if folder.is_file() else folder
    for candidate in (folder / STUDENT_INFO, folder.parent / STUDENT_INFO):
        if candidate.exists():
            return json.loads(candidate.read_text())
    run_config = folder.parent / "config.json"
    if run_config.exists():
        c = json.loads(run_config.read_text())
        try:
            return {"grid_size": c["distill"]["grid_size"], "timestep_offset": c["model"]["timestep_offset"]}
        except (KeyError, TypeError):
            return {}
    return {}


def load_student_pipeline(
    model: str = SDXL_BASE,
    lora: str | Path | None = None,
    unet: str | Path | None = None,
    vae: str | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    scheduler: Literal["lcm", "keep"] = "lcm",
    original_inference_steps: int | None = None,
    timestep_offset: int | None = None,
):
    """A stock ``StableDiffusionXLPipeline`` sampling from the student.

    ``lora``: folder from ``save_lora`` (loaded with ``load_lora_weights``); ``unet``: a full
    student's ``unet/`` folder. ``scheduler="lcm"`` installs ``LCMScheduler.from_config`` (k-step
    consistency sampling) with ``original_inference_steps`` = the training grid size N (read from the
    saved student's ``odecm_student.json`` unless given; diffusers' default is 50). With N = 100,
    k = 4 samples at [999, 749, 499, 249], the training grid's points; with 50 it would be
    [999, 759, 499, 259], two of them off the grid.

    A student trained with the paper's indexing (``timestep_offset=1``: the UNet saw t_n = 10 n) gets a
    warning: diffusers' timesteps are one below (999 for the paper's 1000), so a stock pipeline runs
    such a student one index early (use ``sdxl.sample`` for exact paper-indexed sampling).

    Use ``guidance_scale=1`` (or 0) when calling it: the paper's student is not w-conditioned and the
    teacher's guidance is distilled in."""
    import warnings

    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    info = read_student_info(lora if lora is not None else (Path(unet).parent if unet is not None else None))
    if original_inference_steps is None:
        original_inference_steps = info.get("grid_size")
    if timestep_offset is None:
        timestep_offset = info.get("timestep_offset", 0)
    dt = resolve_dtype(dtype)
    kw: dict[str, Any] = {"torch_dtype": dt}
    if vae is not None:
        kw["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dt)
    if unet is not None:
        kw["unet"] = UNet2DConditionModel.from_pretrained(unet, torch_dtype=dt)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, **kw)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    if scheduler == "lcm":
        extra = {"original_inference_steps": int(original_inference_steps)} if original_inference_steps else {}
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **extra)
        if timestep_offset:
            warnings.warn(f"this student was trained with the paper's timestep indexing (timestep_offset="
                          f"{timestep_offset}): the UNet saw t_n = T n / N, and diffusers' LCMScheduler feeds it "
                          f"timesteps {timestep_offset} below (999 for 1000), one index early; use sdxl.sample for "
                          "paper-indexed sampling", stacklevel=2)
    elif scheduler != "keep":
        raise ValueError(f"scheduler={scheduler!r}; allowed: 'lcm', 'keep'")
    return pipe.to(device)


def read_lora_metadata(folder: str | Path) -> dict:
    """The LoRA config stored next to the weights (rank, alpha, target modules), if any."""
    from safetensors import safe_open

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}
