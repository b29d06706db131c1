"""Fake inputs for SDXL training tests: a precomputed-target folder of random samples (no teacher run).

``write_fake_targets(folder, model, n=16, poison=None)`` writes what ``python -m sdxl.precompute_targets``
writes for tiny_cpu (N = 10, DDIM, diffusers indexing, w = 9 imagen, zeroed uncond) with random
``x_tn``, ``n`` and endpoints at the tiny model's shapes; ``poison`` lists sample indices whose
endpoint is NaN (a corrupt sample: its loss is NaN on whichever rank reads it).
``sample_at(num_samples, seed, position)`` is the sample the run reads at ``position`` of its first
epoch (global step ``position // batch_size``, slot ``position % batch_size``: rank ``slot % W``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from sdxl.tiny import TINY_SIZES


def write_fake_targets(folder: Path, model: str, n: int = 16, poison: Sequence[int] = (), seed: int = 0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    L, h = TINY_SIZES["latent_size"], TINY_SIZES["hidden"]
    res = TINY_SIZES["image_size"]
    tensors = {"x_tn": torch.randn(n, 4, L, L, generator=g), "n": torch.randint(1, 11, (n,), generator=g),
               "target": torch.randn(n, 4, L, L, generator=g), "prompt_embeds": torch.randn(n, 77, 2 * h, generator=g),
               "text_embeds": torch.randn(n, h, generator=g),
               "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32)}
    for i in poison:
        tensors["target"][i] = float("nan")
    save_file(tensors, str(folder / "targets-00000.safetensors"), metadata={"count": str(n), "skipped": "0"})
    index = {"complete": True, "shards": {"targets-00000.safetensors": n}, "num_examples": n, "solver": "ddim",
             "grid_size": 10, "grid": "skip", "timestep_offset": 0, "mask_mode": "subset", "guidance_scale": 9.0,
             "cfg_convention": "imagen", "uncond": "zeros", "model": str(model), "seed": seed}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def sample_at(num_samples: int, seed: int, position: int) -> int:
    """The dataset index at ``position`` of epoch 0's shuffled order (``sdxl.data.ShardedSampler``)."""
    from sdxl.data import ShardedSampler

    return ShardedSampler(num_samples, seed=seed, shuffle=True).permutation(0)[position]
