"""Folders shaped like the outputs of sdxl.reference / sdxl.train / sdxl.sample, written without a model
(for the input checks of the SDXL evaluation; tests that need real numbers run the real commands)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl.features_cache import save_images
from sdxl.eval_shards import image_path, shard_path, write_latent_shard


def fake_reference(folder: Path, n: int = 2, offset: int = 1, solver: str = "ddim", grid_size: int = 10,
                   guidance_scale: float = 9.0, written: int | None = None, model: str = "tiny") -> Path:
    """A teacher-reference folder with ``written`` (default all ``n``) captions done, indexing ``offset``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [f"caption {i}" for i in range(n)]
    (folder / "captions.json").write_text(json.dumps(captions))
    noise = folder / "noise.safetensors"
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(0))}, str(noise))
    key = {"model": "tiny@0", "vae": None, "dtype": "fp32", "timestep_offset": offset, "solver": solver,
           "grid_size": grid_size, "grid": "skip", "guidance_scale": guidance_scale, "cfg_convention": "imagen",
           "uncond": "zeros", "captions_sha256": "0", "num_captions": n, "noise_seed": 0, "resolution": 8}
    config = {"model": {"pretrained": model, "vae": None, "dtype": "fp32", "vae_dtype": None, "timestep_offset": offset},
              "cache_dir": str(folder.parent), "decode": True}
    (folder / "manifest.json").write_text(json.dumps({"kind": "teacher_reference", "key": key, "noise_file": str(noise),
                                                      "config": config, "complete": written in (None, n)}))
    idx = list(range(n if written is None else written))
    if idx:
        save_images(torch.rand(len(idx), 3, 8, 8), [image_path(folder, i) for i in idx])
        write_latent_shard(shard_path(folder, idx), torch.randn(len(idx), 4, 4, 4), idx)
    return folder


def fake_run(folder: Path, offset: int = 1, method: str = "cd", solver: str = "ddim", grid_size: int = 10,
             guidance_scale: float = 9.0, config: bool = True) -> Path:
    """A training-run folder (``config.json`` as sdxl.train writes it, when ``config``) with a ``lora/`` folder;
    returns the LoRA folder."""
    folder = Path(folder)
    lora = folder / "lora"
    lora.mkdir(parents=True, exist_ok=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"not a real LoRA")
    if config:
        (folder / "config.json").write_text(json.dumps({
            "model": {"pretrained": "tiny", "timestep_offset": offset},
            "student": {"sigma_data": 0.5, "timestep_scaling": 10.0},
            "teacher": {"guidance_scale": guidance_scale, "cfg_convention": "imagen", "uncond": "zeros"},
            "distill": {"method": method, "solver": solver, "grid_size": grid_size}}))
    return lora


def files_under(root: Path) -> dict[str, int]:
    """``{relative path: mtime_ns}`` of every file under ``root`` (to assert that nothing was written)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}


def fake_samples(folder: Path, reference: Path, n: int = 2, steps=(1,), written: int | None = None,
                 key: dict | None = None) -> Path:
    """A student-samples folder (``k<k>/`` per step with ``written`` captions done) on ``reference``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "kind": "student_samples", "key": key or {"weights": "fake"}, "reference": str(reference),
        "steps": list(steps), "labels": {"method": "cd", "solver": "ddim"}, "timestep_offset": 1}))
    idx = list(range(n if written is None else written))
    for k in steps:
        if idx:
            save_images(torch.rand(len(idx), 3, 8, 8), [image_path(folder / f"k{k}", i) for i in idx])
            write_latent_shard(shard_path(folder / f"k{k}", idx), torch.randn(len(idx), 4, 4, 4), idx)
    return folder
