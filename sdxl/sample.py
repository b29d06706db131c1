"""Student samples for SDXL evaluation: ``python -m sdxl.sample --set reference=DIR weights=RUN/lora``.

k-step consistency sampling (LCM's multistep sampler with re-noising), from the **same stored
initial noise** ``x_T^(i)`` as the teacher reference (read from the reference folder's manifest):

    x <- x_T
    for j, t_j in enumerate(timesteps):            # k=1: [999]; 2: [999, 499]; 4: [999, 749, 499, 249]
        x0 <- f_theta(x, t_j, cond)                  # student consistency function (LCM boundary)
        if j < k - 1: x <- alpha(t_{j+1}) x0 + sigma(t_{j+1}) z_j,   z_j ~ N(0, I)
    sample = x0

Timesteps are in diffusers indexing (+1 with ``model.timestep_offset=1``). The re-noising draws
``z_j`` come from a generator seeded by ``(renoise_seed, caption index)``, so samples do not depend
on batch size or sharding. With k = 1 the sample is ``f_theta(x_T, T)``, the student side of the
paper's ODE error (eq. 6). The student is not guidance-conditioned (paper); CFG is distilled in.

Layout of ``out_dir``::

    manifest.json        reference folder, weights, labels (method, solver), steps, timesteps
    k1/shards/*.safetensors, k1/images/00000.png ...   (same layout as sdxl.reference)
    k2/...  k4/...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from .eval_config import SampleConfig, cli_config, resolve_model, student_timesteps
from .reference import (SDXLBundle, _caption_seed, _device, image_path, latents_to_images, shard_done, shards_of,
                        write_latent_shard)

Tensor = torch.Tensor

__all__ = ["multistep_sample", "load_student_bundle", "find_run_labels", "run_sample"]


def multistep_sample(student: Callable[[Tensor, Tensor, Any], Tensor], schedule, x_T: Tensor, timesteps: list[int],
                     cond: Any, renoise: list[Tensor] | None = None) -> Tensor:
    """LCM multistep sampling (formula in the module docstring); ``renoise[j]`` is ``z_j``, shape of ``x_T``."""
    x = x_T
    x0 = x_T
    for j, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = student(x, tt, cond)
        if j + 1 < len(timesteps):
            tn = torch.full((x.shape[0],), float(timesteps[j + 1]), device=x.device, dtype=torch.float64)
            a = schedule.alpha(tn).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
            s = schedule.sigma(tn).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
            x = a * x0 + s * renoise[j].to(x0)
    return x0


def load_student_bundle(cfg: SampleConfig, cache_dir: str | Path, device: torch.device):
    """Load text encoders, VAE and UNet once; put the student's weights on it.

    LoRA: ``unet.load_lora_adapter(weights)`` (diffusers' API; the teacher = adapters disabled);
    full: the student's ``unet/`` folder. ``weights=None`` uses the teacher's UNet as the student
    (only useful for smoke runs)."""
    from .student import SDXLStudent
    from .teacher import load_sdxl, resolve_dtype

    parts = load_sdxl(resolve_model(cfg.model, cache_dir), vae=cfg.model.vae, dtype=cfg.model.dtype,
                      vae_dtype=cfg.model.vae_dtype, device=device)
    bundle = SDXLBundle(parts, cfg.model.timestep_offset, device)
    if cfg.kind == "lora":
        if cfg.weights is not None:
            p = Path(cfg.weights)
            folder, name = (p.parent, p.name) if p.is_file() else (p, "pytorch_lora_weights.safetensors")
            parts.unet.load_lora_adapter(str(folder), weight_name=name, prefix="unet", adapter_name="default")
        student = SDXLStudent(parts.unet, bundle.schedule, "lora", prediction_type=bundle.prediction_type)
    else:
        from diffusers import UNet2DConditionModel

        if cfg.weights is None:
            raise ValueError("kind='full' needs weights=<folder with unet/>")
        unet = UNet2DConditionModel.from_pretrained(Path(cfg.weights) / "unet", torch_dtype=resolve_dtype(cfg.model.dtype))
        unet = unet.to(device).requires_grad_(False).eval()
        student = SDXLStudent(unet, bundle.schedule, "full", teacher_unet=parts.unet,
                              prediction_type=bundle.prediction_type,
                              w_embedding_dim=unet.config.get("time_cond_proj_dim"))
    return bundle, student.eval()


def find_run_labels(weights: str | None) -> dict:
    """``method`` / ``solver`` from a training run's resolved config (``config.json`` / ``config.yaml``
    in the weights folder or up to two parents), if there is one."""
    if weights is None:
        return {}
    import yaml

    p = Path(weights)
    for folder in [p if p.is_dir() else p.parent, *list((p if p.is_dir() else p.parent).parents)[:2]]:
        for name in ("config.json", "config.yaml", "resolved_config.json"):
            f = folder / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
                    d = data.get("distill", {})
                    if "method" in d:
                        return {"method": d["method"], "solver": d.get("solver")}
                except Exception:  # not a run config
                    continue
    return {}


def run_sample(cfg: SampleConfig, loader: Callable[[], tuple[SDXLBundle, Any]] | None = None) -> tuple[Path, dict]:
    """Write k-step student samples for every k in ``cfg.steps``; finished shards are skipped."""
    from tqdm.auto import tqdm

    from .features import _state, save_images

    state = _state()
    ref = Path(cfg.reference)
    rman = json.loads((ref / "manifest.json").read_text())
    captions = json.loads((ref / "captions.json").read_text())
    resolution = int(rman["key"]["resolution"])
    out = Path(cfg.out_dir)
    offset = cfg.model.timestep_offset
    if rman["config"]["model"].get("timestep_offset", 0) != offset:
        raise ValueError("model.timestep_offset must match the reference's (same timestep indexing)")
    shards = shards_of(len(captions), cfg.shard_size)
    previous = json.loads((out / "manifest.json").read_text()).get("labels", {}) if (out / "manifest.json").is_file() else {}
    labels = {**previous, **find_run_labels(cfg.weights),
              **{k: v for k, v in (("method", cfg.method), ("solver", cfg.solver)) if v}}
    manifest = {"kind": "student_samples", "reference": str(ref), "weights": cfg.weights, "labels": labels,
                "steps": cfg.steps, "timesteps": {str(k): student_timesteps(k, offset) for k in cfg.steps},
                "config": cfg.model_dump(mode="json")}
    todo = {k: [j for j, idx in enumerate(shards) if not shard_done(out / f"k{k}", j, idx, True)] for k in cfg.steps}
    stats = {"student_calls": 0, "shards_computed": {k: [] for k in cfg.steps}}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if not any(todo.values()):
        return out, stats

    from safetensors.torch import load_file

    device = _device(cfg.device)
    bundle, student = loader() if loader is not None else load_student_bundle(cfg, rman["config"].get("cache_dir", "."), device)
    noise = load_file(rman["noise_file"])["noise"]
    calls = [0]

    def counted(x, t, cond):
        calls[0] += 1
        with torch.no_grad():
            return student(x, t, cond)

    for k in cfg.steps:
        ts = student_timesteps(k, offset)
        mine = [j for j in todo[k] if j % state.num_processes == state.process_index]
        for j in tqdm(mine, desc=f"student k={k}", disable=not cfg.progress):
            idx, outs = shards[j], []
            for b in range(0, len(idx), cfg.batch_size):
                bi = idx[b:b + cfg.batch_size]
                cond = bundle.cond([captions[i] for i in bi], resolution)
                z = [torch.stack([torch.randn(noise.shape[1:], generator=torch.Generator().manual_seed(
                    _caption_seed(cfg.renoise_seed, i, stream=1 + jj))) for i in bi]).to(device) for jj in range(k - 1)]
                lat = multistep_sample(counted, bundle.schedule, noise[bi].to(device), ts, cond, z).float()
                save_images(latents_to_images(bundle.parts.vae, lat), [image_path(out / f"k{k}", i) for i in bi])
                outs.append(lat.cpu())
            write_latent_shard(out / f"k{k}" / "shards" / f"{j:05d}.safetensors", torch.cat(outs), idx)
            stats["shards_computed"][k].append(j)
    stats["student_calls"] = calls[0]
    state.wait_for_everyone()
    return out, stats


def main(argv=None) -> None:
    cfg = cli_config(SampleConfig, argv, "Student k-step samples from the reference's shared noise.",
                     prog="python -m sdxl.sample")
    out, stats = run_sample(cfg)
    print(json.dumps({"out_dir": str(out), **{k: v for k, v in stats.items()}}, default=str))


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
