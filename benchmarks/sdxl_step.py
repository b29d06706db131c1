"""Seconds per SDXL CD / Direct CD training iteration, peak memory, MFU and HFU, honestly counted.

    python -m benchmarks.sdxl_step                         # GPU: CD + Direct CD at the paper setup
    python -m benchmarks.sdxl_step --methods cd --compile  # torch.compile the UNet
    python -m benchmarks.sdxl_step --direct-cd-estimate    # Direct CD from the measured teacher step
    python -m benchmarks.sdxl_step --flops-only            # the FLOP accounting alone (meta device, any CPU)
    python -m benchmarks.sdxl_step --switch-cost           # adapter off/on cost: SDXL architecture + tiny
    python -m benchmarks.sdxl_step --tiny                  # CPU default: tiny random SDXL-architecture model

Paper setup: batch 16, 1024 px (128 x 128 latents), LoRA r = 64 on the paper's modules, N = 100 skip
grid, w = 9 (CFG: the teacher runs at batch 32), stop-gradient target, gradient checkpointing, bf16.
Without ``--model`` the UNet is SDXL base's architecture with random weights: the same FLOPs and
memory, no download.

What is timed: one optimiser step of ``odecm.objectives.consistency_loss`` as ``sdxl.train`` runs it
(one UNet shared by teacher and LoRA student through ``sdxl.teacher.AdapterSwitch``, CFG cond + uncond
in one no-grad call, stop-gradient target, AdamW, clipping) on synthetic latents and embeddings, so
data loading, VAE and text encoders are excluded. The median of ``--iters`` timed iterations after
``--warmup`` ones.

FLOPs (``benchmarks.sdxl_flops``, ``torch.utils.flop_counter.FlopCounterMode``): *hardware* FLOPs =
one extra iteration counted on the same modules, phase by phase (teacher, target, student forward,
student backward), including what the implementation recomputes (gradient checkpointing's forward,
flash attention's Q K^T in its backward); *model* FLOPs = the math of the passes the iteration needs
(per-image base forward, LoRA forward and LoRA backward, counted once at batch 1, times the images each
pass sees). MFU = model FLOPs / (s x peak), HFU = hardware FLOPs / (s x peak), peak = dense bf16 (H100 /
H200 SXM 989 TFLOP/s; ``--peak-tflops`` for others). On SDXL at 1024 px the LoRA student's forward +
backward is 2.17 LoRA forwards (15.89 / 7.32 TFLOP), not 3 base forwards; a CD iteration is 587.8 model
TFLOP, not 649.

Direct CD (``--direct-cd-estimate``): the expected number of teacher solver steps per iteration with
per-sample n and full-batch masking is ``E[max n] = sum_{k=1..N} (1 - ((k-1)/N)^B)`` (94.6 at N = 100,
B = 16); the estimate is that times the measured teacher step, plus the student's forward + backward;
``--direct-cd-iterations 1`` also times full iterations. The same teacher step gives the reference
generation throughput of the UNet (B images per N CFG teacher steps; the VAE decode not included).
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

from .sdxl_flops import counted_iteration, meta_twin, model_flops, pass_flops, switch_cost, unet_inputs

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "4090": 165.0}

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
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def expected_max_index(N: int, B: int) -> float:
    """``E[max of B iid uniform draws on 1..N]`` = the mean Direct CD depth with full-batch masking."""
    return sum(1.0 - ((k - 1) / N) ** B for k in range(1, N + 1))


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


class Bench:
    """The modules of one benchmark: a LoRA UNet (student) whose base is the CFG teacher."""

    def __init__(self, args, device):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        from odecm.schedules import sdxl_schedule
        from sdxl.student import SDXLStudent, add_lora
        from sdxl.teacher import make_teacher

        self.args, self.device = args, device
        self.gpu = device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32) if self.gpu \
            else torch.float32
        torch.manual_seed(0)
        self.unet = build_unet(args, device, self.dtype)
        self.latent = args.resolution // (8 if not args.tiny else 2)
        add_lora(self.unet, args.lora_rank, args.lora_rank)
        self.unet.set_attn_processor(AttnProcessor2_0() if args.attention == "sdpa" else AttnProcessor())
        if args.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if args.grad_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.schedule = sdxl_schedule()
        self.student = SDXLStudent(self.unet, self.schedule, "lora", compute_dtype=self.dtype)
        self.teacher = make_teacher(self.unet, self.schedule, args.guidance_scale, "imagen", "zeros", base_model=True)
        self.grid = make_grid("skip", self.schedule, args.num_steps)
        self.solver = get_solver(args.solver)
        self.target = EMATarget(self.student, 0.0)
        self.optimizer = make_optimizer(self.student.parameters(), "adamw8bit" if args.adamw8bit else "adamw", lr=1e-4)
        self.autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.gpu and self.dtype != torch.float32)
        self.gen = torch.Generator().manual_seed(0)
        self._per_image: dict | None = None
        B = args.batch_size
        _, kw = unet_inputs(self.unet, B, self.latent, device, torch.float32)
        self.cond = {"prompt_embeds": kw["encoder_hidden_states"], "text_embeds": kw["added_cond_kwargs"]["text_embeds"],
                     "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * B,
                                              dtype=torch.float32, device=device)}

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def provider(self, method: str):
        if method == "cd":
            return CDTarget(self.teacher, self.solver, self.grid, self.target)
        return DirectCDTarget(self.teacher, self.solver, self.grid, mask_mode=self.args.mask_mode)

    def draw(self):
        B = self.args.batch_size
        x0 = torch.randn(B, 4, self.latent, self.latent, generator=self.gen).to(self.device)
        return x0, draw_indices(B, self.args.num_steps, self.args.index_scheme, self.gen).to(self.device)

    def step(self, provider, draw=None) -> tuple[float, dict]:
        x0, n = draw if draw is not None else self.draw()
        self.sync()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            terms = consistency_loss(self.student, provider, x0, n, self.grid, self.schedule, cond=self.cond,
                                     generator=self.gen)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.sync()
        return time.perf_counter() - t0, terms

    def flops(self, method: str, draw) -> dict:
        """Hardware FLOPs by phase (counted on the run's modules) and model FLOPs (the passes' math)."""
        x0, n = draw
        with self.autocast:
            phases = counted_iteration(self.student, self.teacher, self.solver, self.grid, self.schedule, self.target,
                                       method, x0, n, self.cond, self.args.mask_mode)
        evals = phases.pop("teacher_sample_evals")
        if self._per_image is None:  # the math of each pass, counted once at batch 1 on the same UNet
            self._per_image = pass_flops(self.unet, self.latent, self.device, self.dtype)
        per, B = self._per_image, self.args.batch_size
        cfg_factor = 2  # cond + uncond in one batched teacher call (w != 1)
        return {**{f"{k}_tflop": v / 1e12 for k, v in phases.items()}, "teacher_sample_evals": evals,
                "hardware_tflop": sum(phases.values()) / 1e12,
                "model_tflop": model_flops(per, method, B, evals, cfg_factor) / 1e12,
                "checkpoint_recompute_tflop": B * per["recompute"] / 1e12 if self.args.grad_checkpointing else 0.0,
                "per_image_tflop": {k: v / 1e12 for k, v in per.items()}}

    @torch.no_grad()
    def teacher_step_seconds(self, repeats: int) -> float:
        """One CFG teacher solver step on the whole batch (what a Direct CD / reference step costs)."""
        x, _ = self.draw()
        t_from = torch.full((x.shape[0],), float(self.grid[-1]), device=self.device)
        t_to = torch.full((x.shape[0],), float(self.grid[-2]), device=self.device)
        times = []
        for _ in range(repeats + 1):
            self.sync()
            t0 = time.perf_counter()
            with self.autocast:
                self.solver.step(self.teacher, x, t_from, t_to, self.cond)
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def bench_method(bench: Bench, method: str) -> dict:
    args = bench.args
    # Direct CD's cost depends on n: its timed iterations reuse the counted iteration's draw
    counted = bench.draw()
    flops = bench.flops(method, counted)  # eager, before any compile (the counter does not see compiled kernels)
    if args.compile:
        bench.unet.compile(backend=args.compile_backend)
    provider = bench.provider(method)
    if bench.gpu:
        torch.cuda.reset_peak_memory_stats()
    iters = args.iters if method == "cd" else args.direct_cd_iterations
    warmup = args.warmup if method == "cd" else args.direct_cd_warmup
    times, evals, toggles = [], [], []
    for it in range(warmup + iters):
        before = bench.student.unet.__dict__.get("_odecm_adapter_switch")
        count0 = before.toggles if before is not None else 0
        dt, terms = bench.step(provider, counted if method == "direct_cd" else None)
        switch = bench.student.unet.__dict__.get("_odecm_adapter_switch")
        if it >= warmup:
            times.append(dt)
            evals.append(terms["target_evals"])
            toggles.append(switch.toggles - count0 if switch is not None else 0)
    s_it = statistics.median(times) if times else None
    name = torch.cuda.get_device_name(bench.device) if bench.gpu else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if bench.gpu else args.peak_tflops
    row = {"method": method, "solver": args.solver, "device": name, "batch_size": args.batch_size,
           "resolution": args.resolution, "num_steps": args.num_steps, "lora_rank": args.lora_rank,
           "mask_mode": args.mask_mode if method == "direct_cd" else None, "dtype": str(bench.dtype).split(".")[-1],
           "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
           "seconds_per_iteration": s_it, "seconds_all": times, "images_per_second": args.batch_size / s_it if s_it else None,
           "teacher_sample_evals_per_iteration": statistics.mean(evals) if evals else None,
           "adapter_toggles_per_iteration": statistics.mean(toggles) if toggles else None, **flops,
           "peak_memory_gib": torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.gpu else None}
    if s_it:
        row["mfu"] = flops["model_tflop"] / s_it / peak if peak else None
        row["hfu"] = flops["hardware_tflop"] / s_it / peak if peak else None
    return row


def direct_cd_estimate(bench: Bench, cd_row: dict | None) -> dict:
    """Direct CD s/it from the measured teacher step x E[depth] (+ the CD row's student share)."""
    args = bench.args
    step_s = bench.teacher_step_seconds(args.repeats)
    depth = expected_max_index(args.num_steps, args.batch_size) if args.index_scheme == "per_sample" else \
        (args.num_steps + 1) / 2
    student_s = 0.0
    if cd_row and cd_row.get("seconds_per_iteration"):  # CD = 1 teacher step + target + student
        teacher_share = step_s * (1 + cd_row["target_tflop"] / max(cd_row["teacher_tflop"], 1e-30))
        student_s = max(cd_row["seconds_per_iteration"] - teacher_share, 0.0)
    return {"teacher_step_seconds": step_s, "expected_depth": depth,
            "direct_cd_seconds_per_iteration_estimate": depth * step_s + student_s,
            "reference_images_per_second_unet_only": args.batch_size / (args.num_steps * step_s)}


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.sdxl_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="SDXL hub id / folder (default: random SDXL-architecture UNet)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny random model (default on CPU for timing; --no-tiny = SDXL's architecture)")
    p.add_argument("--methods", nargs="*", default=["cd", "direct_cd"], choices=["cd", "direct_cd"])
    p.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun", "euler_vp", "heun_vp"])
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (SDXL), 4 (tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default 1024 (SDXL), 32 (tiny)")
    p.add_argument("--num-steps", type=int, default=None, help="N; default 100 (SDXL), 10 (tiny)")
    p.add_argument("--guidance-scale", type=float, default=9.0)
    p.add_argument("--mask-mode", default="full", choices=["full", "subset"])
    p.add_argument("--index-scheme", default="per_sample", choices=["per_sample", "shared"])
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--iters", type=int, default=None, help="timed CD iterations; default 10 (SDXL), 2 (tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first iterations; default 3 (SDXL), 1 (tiny)")
    p.add_argument("--direct-cd-iterations", type=int, default=1, help="timed full Direct CD iterations")
    p.add_argument("--direct-cd-warmup", type=int, default=0,
                   help="untimed Direct CD iterations (default 0: CD's warm-up already ran the same kernels)")
    p.add_argument("--direct-cd-estimate", action="store_true", help="estimate Direct CD from the teacher step")
    p.add_argument("--repeats", type=int, default=5, help="timed teacher steps for the estimate")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "default"],
                   help="sdpa (flash / memory-efficient kernels) or diffusers' math AttnProcessor")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; 'eager' traces without generating kernels: CPU flow checks)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--adamw8bit", action="store_true", help="bitsandbytes AdamW8bit")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--flops-only", action="store_true", help="per-pass and per-iteration FLOPs on the meta device")
    p.add_argument("--switch-cost", action="store_true", help="adapter off/on cost (SDXL architecture on meta + tiny)")
    p.add_argument("--out", default="results/bench_sdxl_step")
    args = p.parse_args(argv)
    if args.tiny is None:
        args.tiny = not gpu and not (args.flops_only or args.model)
    paper = not args.tiny
    for name, sdxl_value, tiny_value in (("batch_size", 16, 4), ("resolution", 1024, 32), ("num_steps", 100, 10),
                                         ("iters", 10, 2), ("warmup", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, sdxl_value if paper else tiny_value)
    return args


def flops_only(args) -> dict:
    """The FLOP accounting of the paper setup without running it: per-pass counts on a meta twin of
    SDXL's UNet (or the tiny one), combined as a CD iteration runs them (DDIM / Euler: one CFG teacher
    call at batch 2B; Heun: two)."""
    if args.tiny:
        from sdxl.tiny import tiny_sdxl_pipeline

        config = dict(tiny_sdxl_pipeline(0).unet.config)
    else:
        config = dict(SDXL_BASE_UNET_CONFIG)
    twin = meta_twin(config, args.lora_rank)
    per = pass_flops(twin, args.resolution // (2 if args.tiny else 8))
    B, evals = args.batch_size, 2 if args.solver in ("heun", "heun_vp") else 1
    cd_model = model_flops(per, "cd", B, B * evals)
    depth = expected_max_index(args.num_steps, B)
    return {"per_image_tflop": {k: v / 1e12 for k, v in per.items()},
            "student_fwd_bwd_over_lora_fwd": (per["lora_forward"] + per["lora_backward"]) / per["lora_forward"],
            "cd_model_tflop": cd_model / 1e12,
            "cd_model_plus_checkpoint_recompute_tflop": (cd_model + B * per["recompute"]) / 1e12,
            "old_accounting_tflop": per["base_forward"] * (2 * B * evals + B + 3 * B) / 1e12,
            "direct_cd_teacher_tflop_per_step": 2 * B * evals * per["base_forward"] / 1e12,
            "expected_direct_cd_depth": depth,
            "direct_cd_model_tflop_expected": model_flops(per, "direct_cd", B, depth * B * evals) / 1e12}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args)}
    if args.switch_cost or args.flops_only:
        if args.switch_cost:
            result["switch_cost"] = _switch_cost_rows(args)
        if args.flops_only:
            result["flops"] = flops_only(args)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2))
        return result
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(args, device)
    rows = [bench_method(bench, m) for m in args.methods]
    result["results"] = rows
    if args.direct_cd_estimate:
        result["direct_cd_estimate"] = direct_cd_estimate(bench, next((r for r in rows if r["method"] == "cd"), None))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if "direct_cd_estimate" in result:
        print(json.dumps(result["direct_cd_estimate"], indent=2))
    return result


def _switch_cost_rows(args) -> dict:
    from sdxl.student import add_lora
    from sdxl.tiny import tiny_sdxl_pipeline

    full = meta_twin(SDXL_BASE_UNET_CONFIG, 64)
    tiny = add_lora(tiny_sdxl_pipeline(0).unet, 4, 4)
    return {"sdxl_architecture_r64": switch_cost(full), "tiny_r4": switch_cost(tiny),
            "torch_threads": torch.get_num_threads()}


def format_table(rows: list[dict]) -> str:
    lines = ["| method | device | B | px | compile | s/it | img/s | teacher evals/it | model TFLOP/it | hardware TFLOP/it "
             "| peak GiB | MFU | HFU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v, f: f.format(v) if v is not None else "-")
        lines.append(f"| {r['method']} ({r['solver']}) | {r['device']} | {r['batch_size']} | {r['resolution']} | "
                     f"{r['compile']} | {fmt(r['seconds_per_iteration'], '{:.3f}')} | {fmt(r['images_per_second'], '{:.2f}')} | "
                     f"{fmt(r['teacher_sample_evals_per_iteration'], '{:.0f}')} | {r['model_tflop']:.4g} | "
                     f"{r['hardware_tflop']:.4g} | {fmt(r['peak_memory_gib'], '{:.1f}')} | "
                     f"{fmt(r.get('mfu') and 100 * r['mfu'], '{:.1f}%')} | {fmt(r.get('hfu') and 100 * r['hfu'], '{:.1f}%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
