"""FLOP accounting and adapter-switch cost for the SDXL step benchmark (``benchmarks.sdxl_step``).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; matmul,
convolution and attention), never assumed. Two numbers per iteration:

* *hardware* FLOPs (``counted_iteration``): one training iteration on the exact modules the benchmark
  times (the CFG teacher at batch 2B, the target, the LoRA student with its gradient checkpointing and
  attention kernels), in the order of ``odecm.objectives.consistency_loss``, each phase under its own
  counter: ``teacher``, ``target``, ``student_forward``, ``student_backward``. They include what the
  implementation recomputes: the forward re-run by gradient checkpointing, and the Q K^T product that
  flash / memory-efficient attention recompute in their backward (torch's formulas for those kernels
  count 5 matmuls per attention backward, the math 4). Direct CD with full-batch masking evaluates the
  whole batch at every step, so its teacher phase is one counted step times the depth (max n), which
  equals counting the whole solve (tested), and the solve itself is skipped.
* *model* FLOPs (``model_flops``): the math of the passes the algorithm needs, no recomputation:
  per-image FLOPs of each kind of pass (``pass_flops``: base forward for the teacher, LoRA forward,
  LoRA backward; counted at batch 1 with the math attention processor) times the number of images
  each pass sees in the iteration. MFU uses model FLOPs, HFU hardware FLOPs.

``pass_flops`` also runs on a meta-device twin (``meta_twin``: same config and LoRA, no memory, no
compute), so the SDXL-at-1024-px figures in the docs are measurable on any CPU. On CPU torch has no
formula for its own flash-attention kernel (it counts 0); ``count`` adds torch's SDPA formulas for it.

``switch_cost`` times an off/on adapter pair: diffusers' ``disable_adapters`` / ``enable_adapters``
(a walk over every module, what the student's teacher calls did before) against ``sdxl.teacher.AdapterSwitch``.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from odecm.objectives import add_noise, get_distance
from odecm.solvers import solve

__all__ = ["count", "counted_iteration", "meta_twin", "model_flops", "pass_flops", "switch_cost", "unet_inputs"]


def unet_inputs(unet, batch: int, latent: int, device, dtype) -> tuple[torch.Tensor, dict]:
    """Random UNet inputs of SDXL's layout for ``batch`` images of ``latent`` x ``latent`` latents."""
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = torch.randn(batch, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    kw = dict(encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
              added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                 "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)})
    return x, kw


def meta_twin(config: dict, lora_rank: int | None = None, target_modules=None):
    """A UNet of ``config`` (and LoRA rank ``lora_rank`` on the paper's modules) on the meta device:
    shapes only, no memory."""
    from diffusers import UNet2DConditionModel

    from sdxl.student import LORA_TARGET_MODULES, add_lora

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(dict(config))
    if lora_rank:
        add_lora(twin, lora_rank, lora_rank, target_modules or LORA_TARGET_MODULES)
    return twin


def _raw(formula):
    """A registered (shape-wrapped) flop formula, usable in ``custom_mapping`` as it is."""
    def counted(*args, **kwargs):
        return formula(*args, **kwargs)

    counted._get_raw = True
    return counted


def _cpu_attention_formulas() -> dict:
    import torch.utils.flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    for op, formula in (("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop)):
        if hasattr(aten, op):
            mapping[getattr(aten, op)] = _raw(formula)
    return mapping


def count(fn) -> tuple[Any, int]:
    """``(fn(), its FLOPs)``: torch's counter, plus the SDPA formulas for the CPU flash-attention kernel."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def pass_flops(unet, latent: int, device="meta", dtype=torch.float32) -> dict[str, int]:
    """Per-image FLOPs of each pass of a UNet carrying a LoRA (a meta twin, or the real module at batch
    1), with the math attention processor: base forward (teacher), LoRA forward (target, student), LoRA
    backward without and with gradient checkpointing, and their difference ``recompute``. The UNet's
    attention processors and checkpointing setting are restored."""
    from diffusers.models.attention_processor import AttnProcessor

    from sdxl.teacher import adapter_switch

    x, kw = unet_inputs(unet, 1, latent, device, dtype)
    t = torch.tensor([500.0], device=device)
    switch = adapter_switch(unet)
    was_checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    processors = dict(unet.attn_processors)
    unet.set_attn_processor(AttnProcessor())
    out: dict[str, int] = {}
    try:
        with torch.no_grad():
            switch.set(False)
            _, out["base_forward"] = count(lambda: unet(x, t, **kw).sample)
            switch.set(True)
            _, out["lora_forward"] = count(lambda: unet(x, t, **kw).sample)
        for ckpt in (False, True):
            unet.enable_gradient_checkpointing() if ckpt else unet.disable_gradient_checkpointing()
            y = unet(x, t, **kw).sample
            _, flops = count(lambda: y.float().pow(2).mean().backward())
            out["lora_backward_checkpointed" if ckpt else "lora_backward"] = flops
            for p in unet.parameters():
                p.grad = None
    finally:
        switch.set(True)
        unet.set_attn_processor(processors)
        unet.enable_gradient_checkpointing() if was_checkpointing else unet.disable_gradient_checkpointing()
    out["recompute"] = out["lora_backward_checkpointed"] - out["lora_backward"]
    return out


def model_flops(per: dict[str, int], method: str, batch: int, teacher_sample_evals: float,
                cfg_factor: int = 2) -> int:
    """Model FLOPs of one iteration from per-image pass FLOPs: the CFG teacher (``cfg_factor`` x each
    sample evaluation, base weights), the target (CD: one LoRA forward per image) and the student
    (LoRA forward + backward per image)."""
    teacher = cfg_factor * teacher_sample_evals * per["base_forward"]
    target = batch * per["lora_forward"] if method == "cd" else 0
    return int(teacher + target + batch * (per["lora_forward"] + per["lora_backward"]))


def counted_iteration(student, teacher, solver, grid, schedule, target_fn, method: str, x0, n, cond,
                      mask_mode: str = "full") -> dict[str, int]:
    """FLOPs of one CD / Direct CD iteration, by phase, on the modules given (see the module docstring)."""
    from odecm.denoisers import NFECounter

    t_n = grid[n.cpu()].to(x0.device, torch.float32)
    x_tn = add_noise(schedule, x0, t_n, torch.randn_like(x0))
    flops: dict[str, int] = {}
    teacher = NFECounter(teacher)
    with torch.no_grad():
        if method == "cd":
            t_prev = grid[(n - 1).cpu()].to(x0.device, torch.float32)
            x_prev, flops["teacher"] = count(lambda: solver.step(teacher, x_tn, t_n, t_prev, cond))
            value, flops["target"] = count(lambda: target_fn(x_prev, t_prev, cond))
        elif mask_mode == "full":  # every step evaluates the whole batch: depth x one step, exactly
            depth = int(n.max())
            top = torch.full_like(n, depth)
            _, one = count(lambda: solver.step(teacher, x_tn, grid[top.cpu()].to(x0.device, torch.float32),
                                                 grid[(top - 1).cpu()].to(x0.device, torch.float32), cond))
            # the endpoint's values change no count: the student is compared with x_tn instead of
            # solving ~95 more steps (a minute at the paper setup)
            value, flops["teacher"], flops["target"] = x_tn, depth * one, 0
            teacher.evals *= depth
        else:
            res, flops["teacher"] = count(lambda: solve(solver, teacher, x_tn, grid, n, cond, mask_mode=mask_mode))
            value, flops["target"] = res.x, 0
    l2 = get_distance("l2")
    loss, flops["student_forward"] = count(lambda: l2(student(x_tn, t_n, cond), value.float()).mean())
    _, flops["student_backward"] = count(lambda: loss.backward())
    for p in student.parameters():
        p.grad = None
    flops["teacher_sample_evals"] = teacher.evals
    return flops


def switch_cost(unet, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per off/on adapter pair: diffusers' module walk vs ``AdapterSwitch`` (best of
    ``repeats`` rounds), and the LoRA layer count."""
    from sdxl.teacher import adapter_switch

    switch = adapter_switch(unet)

    def best_ms(fn, inner: int) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best = min(best, (time.perf_counter() - t0) / inner * 1e3)
        return best

    diffusers_ms = best_ms(lambda: (unet.disable_adapters(), unet.enable_adapters()), 2)
    switch_ms = best_ms(lambda: (switch.set(False), switch.set(True)), 50)
    modules = sum(1 for _ in unet.modules())
    return {"lora_layers": len(switch.layers), "modules": modules, "diffusers_pair_ms": diffusers_ms,
            "adapter_switch_pair_ms": switch_ms}
