"""SDXL teacher: tiny pipeline, prompt encoding and the CFG teacher against diffusers' own sampling.

Independent references: diffusers' ``StableDiffusionXLPipeline`` (its ``encode_prompt`` and its
DDIM / Euler sampling loops with the same initial noise and guidance) — the teacher denoiser plus
odecm's solvers must reproduce them. diffusers' ``guidance_scale`` is the imagen convention, and
with ``force_zeros_for_empty_prompt=True`` (SDXL base) and no negative prompt its unconditional
embeddings are zeros with the same time_ids: the paper's choice, ``uncond="zeros"``.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

from odecm.grids import leading  # noqa: E402
from odecm.solvers import solve  # noqa: E402
from sdxl.teacher import (PromptEncoder, load_sdxl, make_teacher, make_time_ids, uncond_zeros)  # noqa: E402
from sdxl.tiny import SDXL_SCHEDULER_CONFIG, TINY_SIZES  # noqa: E402

PROMPTS = ["a red cube on grass", "two blue circles"]
H = TINY_SIZES["image_size"]
L = TINY_SIZES["latent_size"]


@pytest.fixture(scope="module")
def parts(tiny_sdxl_dir):
    return load_sdxl(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def cond(parts):
    return parts.prompt_encoder().cond(PROMPTS, make_time_ids(len(PROMPTS), (H, H), (0, 0), (H, H)))


def test_tiny_pipeline_has_sdxl_structure(parts, tiny_sdxl_dir):
    u = parts.unet.config
    te1, te2 = parts.text_encoder.config, parts.text_encoder_2.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + te2.projection_dim
    for k, v in SDXL_SCHEDULER_CONFIG.items():
        assert parts.scheduler_config[k] == v, k
    # byte-level tokenizers: bos, one id per byte (printable bytes from "!" = 0; last with </w>), eos;
    # tokenizer_2 pads with "!"
    ids = parts.tokenizer("ab").input_ids
    assert ids == [parts.tokenizer.bos_token_id, ord("a") - 33, 256 + ord("b") - 33, parts.tokenizer.eos_token_id]
    assert parts.tokenizer_2.pad_token == "!" and parts.tokenizer.pad_token == "<|endoftext|>"
    # schedule: alphas_cumprod identical to diffusers'
    from diffusers import DDIMScheduler

    ac = DDIMScheduler.from_config(parts.scheduler_config).alphas_cumprod.double()
    t = torch.tensor([0.0, 9.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(parts.schedule.alpha(t) ** 2, ac[t.long()], rtol=5e-6, atol=0)  # diffusers: float32 cumprod


def test_prompt_encoding_matches_diffusers(parts, pipe, cond):
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["prompt_embeds"], pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert cond["prompt_embeds"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    # SDXL base's default unconditional input (no negative prompt): zeros == uncond_zeros
    u = uncond_zeros(cond)
    torch.testing.assert_close(u["prompt_embeds"], npe)
    torch.testing.assert_close(u["text_embeds"], npooled)
    torch.testing.assert_close(u["time_ids"], cond["time_ids"])
    # the empty prompt's embeddings are not zero (so the two options differ)
    e_pe, e_pooled = parts.prompt_encoder()([""])
    assert e_pe.abs().max() > 0.1


def _pipe_latents(pipe, cond, scheduler_cls, x, steps, w, negative=None):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    kw = dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["text_embeds"])
    if negative is not None:
        kw.update(negative_prompt_embeds=negative[0].expand_as(cond["prompt_embeds"]),
                  negative_pooled_prompt_embeds=negative[1].expand_as(cond["text_embeds"]))
    return pipe(num_inference_steps=steps, guidance_scale=w, latents=x.clone(), height=H, width=H,
                output_type="latent", **kw).images


@pytest.mark.parametrize("w,uncond", [(9.0, "zeros"), (3.0, "empty")])
def test_teacher_ddim_reproduces_pipeline(parts, pipe, cond, w, uncond):
    """odecm DDIM on diffusers' leading grid (ends at alphas_cumprod[0]) == DDIMScheduler sampling."""
    from diffusers import DDIMScheduler

    x = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(0))
    empty = parts.prompt_encoder()([""]) if uncond == "empty" else None
    ref = _pipe_latents(pipe, cond, DDIMScheduler, x, 4, w, negative=empty)
    teacher = make_teacher(parts.unet, parts.schedule, w, "imagen", uncond, empty_embeddings=empty)
    grid = leading(parts.schedule, 4, steps_offset=1, final="first")
    with torch.no_grad():
        out = solve("ddim", teacher, x, grid, 4, cond)
    assert out.calls == 4  # cond + uncond in one batched UNet call per step
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_teacher_euler_reproduces_pipeline(parts, pipe, cond):
    """diffusers' Euler works on y = x / alpha from sigma_max to 0: x_T = alpha(t_N) y_T, x_0 = y_0."""
    from diffusers import EulerDiscreteScheduler

    y = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(1))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(3)
    init_sigma = float(pipe.scheduler.init_noise_sigma)
    ref = _pipe_latents(pipe, cond, EulerDiscreteScheduler, y / init_sigma, 3, 9.0)  # pipeline multiplies by it
    grid = leading(parts.schedule, 3, steps_offset=1, final="clean")
    teacher = make_teacher(parts.unet, parts.schedule, 9.0, "imagen")
    x_T = parts.schedule.alpha(grid[-1]).float() * y
    with torch.no_grad():
        out = solve("euler", teacher, x_T, grid, 3, cond)
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_cfg_conventions_and_unet_timestep(parts, cond):
    """imagen w == lcm (w - 1); the UNet receives the integer timestep of the grid point."""
    seen = []
    hook = parts.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        x = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([999.0, 9.0])
        a = make_teacher(parts.unet, parts.schedule, 9.0, "imagen")(x, t, cond)
        b = make_teacher(parts.unet, parts.schedule, 8.0, "lcm")(x, t, cond)
    finally:
        hook.remove()
    torch.testing.assert_close(a.eps, b.eps, rtol=1e-5, atol=1e-5)
    assert seen[0].tolist() == [999.0, 9.0, 999.0, 9.0]  # one call, doubled batch
    # x0 and eps describe the same point: x = alpha x0 + sigma eps
    al, si = parts.schedule.alpha(t).float().view(-1, 1, 1, 1), parts.schedule.sigma(t).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(al * a.x0 + si * a.eps, x, rtol=1e-4, atol=1e-4)


def test_prompt_encoder_truncates_long_prompts(parts):
    enc = PromptEncoder(parts.tokenizer, parts.tokenizer_2, parts.text_encoder, parts.text_encoder_2)
    pe, pooled = enc(["x" * 500])
    assert pe.shape == (1, 77, 64) and torch.isfinite(pe).all() and pooled.shape == (1, 32)
