"""Seconds per training iteration, images/s, peak GPU memory and MFU of SDXL CD / Direct CD.

    python -m benchmarks.sdxl_step                       # GPU: paper setup (batch 16, 1024 px, N=100, w=9)
    python -m benchmarks.sdxl_step --model /weights/sdxl # real weights (speed and memory do not depend on them)
    python -m benchmarks.sdxl_step --tiny                # CPU default: tiny random SDXL-architecture model
    python -m benchmarks.sdxl_step --compile --no-grad-checkpointing --methods cd

What is timed: one full optimiser step of ``odecm.objectives.consistency_loss`` exactly as
``sdxl.train`` runs it (LoRA student on the teacher's UNet with adapters toggled for the teacher,
CFG cond+uncond in one batched no-grad UNet call, stop-gradient target, AdamW), on synthetic
latents and embeddings of the right shapes, so data loading, VAE and text encoders are excluded.
Without ``--model`` on a GPU the UNet is SDXL base's architecture with random weights: same FLOPs
and memory as the real model, no download.

MFU = model FLOPs / (seconds x peak bf16 FLOP/s). Model FLOPs per iteration =
F x (2 x teacher sample-evaluations (CFG doubles each) + B (CD target network) + 3 B (student
forward + backward)), with F the UNet forward FLOPs per image, measured here with
``torch.utils.flop_counter`` (SDXL at 1024 px: 6.76 TFLOP). Gradient-checkpoint recomputation is
not counted (it is overhead, not model FLOPs). Peak: H100/H200 SXM 989 TFLOP/s dense bf16, A100
312; pass ``--peak-tflops`` for other cards.

Speed options (all in ``sdxl.train_config.SpeedConfig``): bf16 frozen weights + bf16 autocast,
fp32 LoRA weights; gradient checkpointing (saves activation memory, costs ~1 extra student
forward); channels_last; SDPA attention (diffusers' AttnProcessor2_0); ``torch.compile`` of the
UNet (fixed shapes: Direct CD ``mask_mode=full`` keeps the batch shape constant; the adapter toggle
costs one recompile); TF32 matmuls for the remaining fp32 work.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from odecm.grids import make_grid
from odecm.objectives import CDTarget, DirectCDTarget, consistency_loss, draw_indices
from odecm.solvers import get_solver
from odecm.training import EMATarget, make_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "4090": 165.0}
SDXL_UNET_TFLOP_1024 = 6.76

SDXL_BASE_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    if args.model:
        return UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype).to(device)
    if args.tiny:
        from sdxl.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(0).unet.to(device, dtype)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    return unet.to(dtype)


def unet_forward_flops(unet, latent: int, cross_dim: int, pooled_dim: int, device, dtype) -> float:
    """FLOPs of one UNet forward for one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    kw = dict(encoder_hidden_states=torch.randn(1, 77, cross_dim, device=device, dtype=dtype),
              added_cond_kwargs={"text_embeds": torch.randn(1, pooled_dim, device=device, dtype=dtype),
                                 "time_ids": torch.zeros(1, 6, device=device, dtype=dtype)})
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500.0], device=device), **kw)
    return float(counter.get_total_flops())


def bench_method(args, method: str, device) -> dict:
    from sdxl.student import SDXLStudent, add_lora
    from sdxl.teacher import make_teacher
    from odecm.schedules import sdxl_schedule

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu and args.dtype == "bf16" else (torch.float16 if gpu and args.dtype == "fp16" else torch.float32)
    torch.manual_seed(0)
    unet = build_unet(args, device, dtype)
    cross_dim = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    latent = args.resolution // (8 if not args.tiny else 2)
    flops_per_image = unet_forward_flops(unet, latent, cross_dim, pooled_dim, device, dtype)
    add_lora(unet, args.lora_rank, args.lora_rank)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        unet.compile()
    schedule = sdxl_schedule()
    student = SDXLStudent(unet, schedule, "lora", compute_dtype=dtype)
    teacher = make_teacher(unet, schedule, args.guidance_scale, "imagen", "zeros", base_model=True)
    grid = make_grid("skip", schedule, args.num_steps)
    solver = get_solver(args.solver)
    target = EMATarget(student, 0.0)
    provider = (CDTarget(teacher, solver, grid, target) if method == "cd"
                else DirectCDTarget(teacher, solver, grid, mask_mode=args.mask_mode))
    opt_name = "adamw8bit" if args.adamw8bit else "adamw"
    optimizer = make_optimizer(student.parameters(), opt_name, lr=1e-4)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    B = args.batch_size
    gen = torch.Generator().manual_seed(0)
    cond = {"prompt_embeds": torch.randn(B, 77, cross_dim, generator=gen).to(device),
            "text_embeds": torch.randn(B, pooled_dim, generator=gen).to(device),
            "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * B,
                                     dtype=torch.float32, device=device)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=gpu and dtype != torch.float32)
    times, evals, depth = [], [], []
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for it in range(args.warmup + args.iters):
        x0 = torch.randn(B, 4, latent, latent, generator=gen).to(device)
        n = draw_indices(B, args.num_steps, args.index_scheme, gen).to(device)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            terms = consistency_loss(student, provider, x0, n, grid, schedule, cond=cond, generator=gen)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
            evals.append(terms["target_evals"])
            depth.append(terms["target_steps"])
    s_it = statistics.median(times)
    cfg_factor = 2 if args.guidance_scale != 1 else 1
    unet_images = cfg_factor * statistics.mean(evals) + (B if method == "cd" else 0) + 3 * B
    model_flops = flops_per_image * unet_images
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if gpu else args.peak_tflops
    out = {
        "method": method, "solver": args.solver, "device": name, "batch_size": B, "resolution": args.resolution,
        "latent": latent, "num_steps": args.num_steps, "mask_mode": args.mask_mode if method == "direct_cd" else None,
        "index_scheme": args.index_scheme, "dtype": str(dtype).replace("torch.", ""), "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing, "channels_last": args.channels_last, "optimizer": opt_name,
        "trainable_params": trainable, "model": args.model or ("tiny" if args.tiny else "sdxl-architecture (random)"),
        "seconds_per_iteration": s_it, "seconds_all": times, "images_per_second": B / s_it,
        "teacher_sample_evals_per_iteration": statistics.mean(evals), "teacher_depth": statistics.mean(depth),
        "unet_forward_tflop_per_image": flops_per_image / 1e12,
        "model_tflop_per_iteration": model_flops / 1e12,
        "achieved_tflops": model_flops / s_it / 1e12,
        "mfu": (model_flops / s_it / 1e12) / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
    }
    del unet, student, teacher, optimizer
    if gpu:
        torch.cuda.empty_cache()
    return out


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.sdxl_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SDXL hub id / folder (default: random SDXL-architecture UNet)")
    p.add_argument("--tiny", action="store_true", default=not gpu, help="tiny random model (default on CPU)")
    p.add_argument("--methods", nargs="+", default=["cd", "direct_cd"], choices=["cd", "direct_cd"])
    p.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun"])
    p.add_argument("--batch-size", type=int, default=16 if gpu else 4)
    p.add_argument("--resolution", type=int, default=1024 if gpu else 32)
    p.add_argument("--num-steps", type=int, default=100)
    p.add_argument("--guidance-scale", type=float, default=9.0)
    p.add_argument("--mask-mode", default="full", choices=["full", "subset"])
    p.add_argument("--index-scheme", default="per_sample", choices=["per_sample", "shared"])
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--iters", type=int, default=5 if gpu else 2)
    p.add_argument("--warmup", type=int, default=2 if gpu else 1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--adamw8bit", action="store_true", help="bitsandbytes AdamW8bit (must be installed)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default="results/bench_sdxl_step")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny and args.num_steps == 100 and device.type == "cpu":
        args.num_steps = 10  # keep CPU Direct CD short
    rows = [bench_method(args, m, device) for m in args.methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    lines = ["| method | device | B | px | s/it | img/s | teacher evals/it | peak GiB | UNet TFLOP/img | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['method']} ({r['solver']}) | {r['device']} | {r['batch_size']} | {r['resolution']} | "
                     f"{r['seconds_per_iteration']:.3f} | {r['images_per_second']:.2f} | "
                     f"{r['teacher_sample_evals_per_iteration']:.0f} | {mem} | {r['unet_forward_tflop_per_image']:.4g} | {mfu} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
