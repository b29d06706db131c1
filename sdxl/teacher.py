"""The SDXL teacher: components, prompt encoding, micro-conditioning and the CFG denoiser.

Everything loads from a hub id (default ``stabilityai/stable-diffusion-xl-base-1.0``) or a local
folder with the same layout (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), e.g. one written by ``sdxl.tiny.build_tiny_sdxl``.

Conditioning layout (one dict, batch first; what ``odecm`` passes around as ``cond``)::

    {"prompt_embeds": (B, 77, 2048),  # penultimate hidden states of encoder 1 (768) ++ encoder 2 (1280)
     "text_embeds":   (B, 1280),      # pooled, projected output of encoder 2
     "time_ids":      (B, 6)}         # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

Teacher denoiser: the UNet predicts eps at the **model's timestep** ``t`` (diffusers indexing by
default: ``t`` in 0..999, noise level ``alphas_cumprod[t]``; see ``odecm.schedules``). On the grids
used here ``t`` is an integer; it is passed to the UNet as a float32 tensor holding that integer.
``x0_hat = (x - sigma(t) eps_hat) / alpha(t)``.

CFG (``odecm.denoisers.CFGDenoiser``), convention always named; the paper uses
``convention="imagen"``, ``w = 9``: ``eps = eps_u + 9 (eps_c - eps_u)``. Unconditional input:

* ``uncond="zeros"`` (paper; LCM-LoRA's training script; diffusers' SDXL pipeline with
  ``force_zeros_for_empty_prompt=True`` and no negative prompt): ``prompt_embeds`` and
  ``text_embeds`` zeroed, ``time_ids`` kept;
* ``uncond="empty"``: the embeddings of the empty prompt ``""``, ``time_ids`` kept.

Cond and uncond go through the UNet in one call on a doubled batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from odecm.denoisers import CFGDenoiser, Denoiser, EpsDenoiser, VDenoiser, X0Denoiser
from odecm.schedules import DiscreteSchedule

Tensor = torch.Tensor

__all__ = [
    "SDXL_BASE",
    "SDXLComponents",
    "load_sdxl",
    "schedule_from_scheduler_config",
    "PromptEncoder",
    "make_time_ids",
    "UNetModel",
    "adapters_disabled",
    "AdapterSwitch",
    "adapter_switch",
    "sdxl_denoiser",
    "uncond_zeros",
    "uncond_from_embeddings",
    "make_teacher",
    "encode_latents",
    "decode_latents",
    "DTYPES",
]

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- loading
@dataclass
class SDXLComponents:
    """The parts of an SDXL checkpoint this package uses. ``text`` parts may be None when
    prompts come precomputed (latent cache); ``vae`` may be None when latents do."""

    unet: nn.Module
    scheduler_config: dict
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    source: str = ""

    @property
    def schedule(self) -> DiscreteSchedule:
        return schedule_from_scheduler_config(self.scheduler_config)

    def prompt_encoder(self) -> "PromptEncoder":
        if self.text_encoder is None:
            raise ValueError("text encoders were not loaded (load_sdxl(..., text_encoders=True))")
        return PromptEncoder(self.tokenizer, self.tokenizer_2, self.text_encoder, self.text_encoder_2)


def load_sdxl(
    model: str = SDXL_BASE,
    vae: str | None = None,
    dtype: str | torch.dtype = "fp32",
    vae_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    text_encoders: bool = True,
    load_vae: bool = True,
    variant: str | None = None,
    revision: str | None = None,
) -> SDXLComponents:
    """Load SDXL components from ``model`` (hub id or local folder) in ``dtype``.

    ``vae`` optionally names a separate VAE (hub id or folder with ``config.json``), e.g.
    ``madebyollin/sdxl-vae-fp16-fix`` (the stock SDXL VAE overflows in fp16; keep it fp32 or use
    the fix). ``vae_dtype`` defaults to fp32 for the stock VAE and to ``dtype`` for a separate one.
    ``variant="fp16"`` picks the hub's half-precision files. Frozen parts are put in eval mode
    with ``requires_grad=False``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = resolve_dtype(dtype)
    kw = dict(variant=variant, revision=revision)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw)
    scheduler_config = dict(EulerDiscreteScheduler.load_config(model, subfolder="scheduler", revision=revision))
    parts = SDXLComponents(unet=unet, scheduler_config=scheduler_config, source=str(model))
    if load_vae:
        if vae is None:
            vdt = resolve_dtype(vae_dtype) if vae_dtype is not None else torch.float32
            parts.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vdt, **kw)
        else:
            vdt = resolve_dtype(vae_dtype) if vae_dtype is not None else dtype
            parts.vae = AutoencoderKL.from_pretrained(vae, torch_dtype=vdt)
    if text_encoders:
        parts.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)
        parts.tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", revision=revision)
        parts.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kw)
        parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            model, subfolder="text_encoder_2", torch_dtype=dtype, **kw)
    for m in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return parts


def schedule_from_scheduler_config(config: dict, timestep_offset: int = 0) -> DiscreteSchedule:
    """``odecm`` schedule holding exactly the float32 ``betas`` / ``alphas_cumprod`` tables (cast to
    float64) that diffusers' scheduler builds from this config: ``beta_schedule`` linear,
    scaled_linear (SDXL: 0.00085 -> 0.012 over 1000 steps) or squaredcos_cap_v2, or ``trained_betas``
    (``odecm.schedules.DiscreteSchedule.from_scheduler_config``). ``timestep_offset`` 0 = diffusers
    indexing, 1 = paper's code. ``rescale_betas_zero_snr=True`` is rejected."""
    return DiscreteSchedule.from_scheduler_config(dict(config), timestep_offset)


# --------------------------------------------------------------------------- prompts
def make_time_ids(
    batch: int,
    original_size: tuple[int, int] | Tensor = (1024, 1024),
    crop_top_left: tuple[int, int] | Tensor = (0, 0),
    target_size: tuple[int, int] | Tensor = (1024, 1024),
    device: str | torch.device = "cpu",
) -> Tensor:
    """SDXL micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, shape (B, 6).

    Each argument is a pair shared by the batch or a (B, 2) tensor of per-sample values (e.g. the
    crop each image got in the data loader)."""
    parts = []
    for v in (original_size, crop_top_left, target_size):
        v = torch.as_tensor(v, dtype=torch.float32, device=device)
        parts.append(v.expand(batch, 2) if v.dim() == 1 else v)
    return torch.cat(parts, dim=1)


class PromptEncoder(nn.Module):
    """SDXL's two-encoder prompt embedding (as diffusers' ``encode_prompt``, ``clip_skip=None``).

    ``prompt_embeds = concat(h1[-2], h2[-2])`` on the last axis (penultimate hidden states of
    CLIPTextModel and CLIPTextModelWithProjection), ``text_embeds`` = encoder 2's projected
    pooled output. Prompts are padded/truncated to each tokenizer's ``model_max_length`` (77)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if enc is self.text_encoder_2:
                pooled = out[0]  # text_embeds: projected pooled output
        return torch.cat(hidden, dim=-1), pooled

    def cond(self, prompts: Sequence[str], time_ids: Tensor | None = None, dtype: torch.dtype = torch.float32) -> dict:
        """The conditioning dict for ``prompts``; ``time_ids`` default to 1024 px, no crop."""
        pe, pooled = self(prompts)
        if time_ids is None:
            time_ids = make_time_ids(pe.shape[0], device=pe.device)
        return {"prompt_embeds": pe.to(dtype), "text_embeds": pooled.to(dtype), "time_ids": time_ids.to(pe.device, dtype)}


# --------------------------------------------------------------------------- denoiser
@contextlib.contextmanager
def adapters_disabled(unet: nn.Module, enabled: bool = True):
    """Within the block, a peft-adapted UNet runs as the base model (diffusers' ``disable_adapters`` /
    ``enable_adapters``: a walk over every module, ~0.1 s per pair on SDXL; ``AdapterSwitch`` is the
    cheap, lazy form the denoisers use)."""
    if not enabled or not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class AdapterSwitch:
    """The on/off state of a peft-adapted UNet's LoRA layers, changed only when a call needs the other state.

    The teacher (adapters off) and the LoRA student (adapters on) share one UNet. Each denoiser call
    asks for its state (``set(enabled)``); nothing happens when the UNet is already in it. A CD or
    Direct CD iteration runs its calls in phases (all teacher solver steps, then the target and the
    student), so it costs one off/on pair per iteration instead of one pair per teacher call
    (Direct CD at N = 100: ~94 -> 1). A switch writes one flag on each LoRA layer of a list made once
    (788 layers on SDXL), without diffusers' walk over all 9,810 modules or peft's ``requires_grad``
    updates (the teacher runs under no_grad). ``toggles`` counts state changes (an off/on pair is 2).

    The student's state must be on whenever its graph is used: a gradient-checkpointed backward
    re-runs the student's forward with the flags as they are then. ``sdxl.loss`` therefore leaves the
    state on at the end of every loss evaluation (the student's own call already does). Once a UNet
    has a switch, change its adapter state only through it (not ``unet.disable_adapters()``), and call
    the UNet through the denoisers (``UNetModel``), which set the state each call needs."""

    def __init__(self, unet: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        states = {bool(layer.disable_adapters) for layer in self.layers}
        if len(states) > 1:
            raise ValueError("AdapterSwitch: the UNet's LoRA layers are partly disabled; enable or disable all first")
        self.enabled = not states.pop() if states else True
        self.toggles = 0
        self._direct = all("_disable_adapters" in vars(layer) or hasattr(type(layer), "_disable_adapters")
                           for layer in self.layers)

    def set(self, enabled: bool) -> None:
        """Put every LoRA layer in state ``enabled`` (no-op when it already is)."""
        enabled = bool(enabled)
        if enabled == self.enabled:
            return
        if self._direct:  # peft's flag, read by every LoRA forward (``BaseTunerLayer.disable_adapters``)
            for layer in self.layers:
                vars(layer)["_disable_adapters"] = not enabled
            if self.layers and bool(self.layers[0].disable_adapters) == enabled:  # peft changed its internals
                self._direct = False
        if not self._direct:
            for layer in self.layers:
                layer.enable_adapters(enabled)
        self.enabled = enabled
        self.toggles += 1


def adapter_switch(unet: nn.Module) -> AdapterSwitch | None:
    """The UNet's ``AdapterSwitch`` (made on first use), or None for a UNet without peft adapters."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return None
    switch = unet.__dict__.get("_odecm_adapter_switch")
    if switch is None:
        switch = AdapterSwitch(unet)
        unet.__dict__["_odecm_adapter_switch"] = switch
    return switch


class UNetModel(nn.Module):
    """``model(x, t, cond) -> unet output`` for odecm's adapters.

    Casts ``x`` and ``cond`` to the UNet's dtype, passes ``t`` as float32 timesteps, and returns the
    output in ``x``'s dtype. On a peft-adapted UNet, ``base_model=True`` runs it with the adapters
    off (the teacher inside a LoRA student) and ``base_model=False`` with them on (the student),
    through the UNet's lazy ``AdapterSwitch``. ``no_grad=True`` for frozen roles. ``timestep_cond``
    (a callable ``(t, cond) -> Tensor``) feeds UNets built with ``time_cond_proj_dim`` (w embedding)."""

    def __init__(self, unet: nn.Module, base_model: bool = False, no_grad: bool = False,
                 timestep_cond: Callable[[Tensor, Any], Tensor] | None = None):
        super().__init__()
        self.unet, self.base_model, self.no_grad, self.timestep_cond = unet, base_model, no_grad, timestep_cond
        self.compute_dtype: torch.dtype | None = None  # None: the UNet's (first parameter's) dtype

    def forward(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        dtype = self.compute_dtype or self.unet.dtype
        grad = contextlib.nullcontext() if not self.no_grad else torch.no_grad()
        switch = adapter_switch(self.unet)
        if switch is not None:
            switch.set(not self.base_model)
        with grad:
            out = self.unet(
                x.to(dtype),
                t.to(torch.float32),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
                timestep_cond=None if self.timestep_cond is None else self.timestep_cond(t, cond).to(dtype),
                return_dict=False,
            )[0]
        return out.to(x.dtype)


_ADAPTERS = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser, "sample": X0Denoiser}


def sdxl_denoiser(unet: nn.Module, schedule: DiscreteSchedule, prediction_type: str = "epsilon",
                  base_model: bool = False, no_grad: bool = False, timestep_cond=None) -> Denoiser:
    """An odecm denoiser around an SDXL UNet (SDXL base predicts ``epsilon``)."""
    if prediction_type not in _ADAPTERS:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {sorted(_ADAPTERS)}")
    model = UNetModel(unet, base_model=base_model, no_grad=no_grad, timestep_cond=timestep_cond)
    return _ADAPTERS[prediction_type](model, schedule)


def uncond_zeros(cond: dict) -> dict:
    """Paper / LCM-LoRA unconditional input: text embeddings zeroed, micro-conditioning (and any
    other key) kept."""
    return {**cond, "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "text_embeds": torch.zeros_like(cond["text_embeds"])}


def uncond_from_embeddings(prompt_embeds: Tensor, text_embeds: Tensor) -> Callable[[dict], dict]:
    """Unconditional input from fixed embeddings (e.g. of the empty prompt), batch 1 or B;
    micro-conditioning taken from ``cond``."""

    def uncond(cond: dict) -> dict:
        B = cond["prompt_embeds"].shape[0]
        pe = prompt_embeds.to(cond["prompt_embeds"]).expand(B, *prompt_embeds.shape[1:])
        te = text_embeds.to(cond["text_embeds"]).expand(B, *text_embeds.shape[1:])
        return {**cond, "prompt_embeds": pe, "text_embeds": te}

    return uncond


def make_teacher(
    unet: nn.Module,
    schedule: DiscreteSchedule,
    guidance_scale: float = 9.0,
    convention: Literal["imagen", "lcm"] = "imagen",
    uncond: Literal["zeros", "empty"] = "zeros",
    prompt_encoder: PromptEncoder | None = None,
    empty_embeddings: tuple[Tensor, Tensor] | None = None,
    prediction_type: str = "epsilon",
    base_model: bool = False,
) -> Denoiser:
    """The teacher: CFG (named ``convention``) around the frozen SDXL UNet, no grad.

    ``base_model=True`` when ``unet`` carries the student's LoRA adapters (they are disabled for
    the teacher call: one copy of the weights). ``uncond="empty"`` needs ``empty_embeddings``
    (prompt_embeds, text_embeds of ``""``) or a ``prompt_encoder`` to compute them."""
    inner = sdxl_denoiser(unet, schedule, prediction_type, base_model=base_model, no_grad=True)
    if uncond == "zeros":
        fn = uncond_zeros
    elif uncond == "empty":
        if empty_embeddings is None:
            if prompt_encoder is None:
                raise ValueError("uncond='empty' needs empty_embeddings or a prompt_encoder")
            empty_embeddings = prompt_encoder([""])
        fn = uncond_from_embeddings(*empty_embeddings)
    else:
        raise ValueError(f"uncond={uncond!r}; allowed: 'zeros', 'empty'")
    return CFGDenoiser(inner, guidance_scale, convention, uncond=fn)


# --------------------------------------------------------------------------- VAE
@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor, generator: torch.Generator | None = None,
                   sample: bool = True) -> Tensor:
    """Pixels in [-1, 1], (B, 3, H, W) -> latents ``z * scaling_factor`` (a posterior sample, or its
    mean with ``sample=False``), float32. (SDXL: 8x downsampling, scaling factor 0.13025.)"""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return z.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Latents (scaled) -> pixels in [-1, 1], float32."""
    return vae.decode((latents / vae.config.scaling_factor).to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)

