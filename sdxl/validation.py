"""Validation images during training (``validation.every`` steps): fixed prompts, fixed noise, k-step sampling.

For each k in ``validation.steps`` the student samples every prompt with LCM's multistep sampler
(``sdxl.sample.multistep_sample``) at k evenly spaced points of the training grid, grid indices
``N, N - N/k, ..., N/k`` (k = 4, N = 100: timesteps 1000, 750, 500, 250 in the paper's indexing,
999, 749, 499, 249 in diffusers'). The initial noise and the re-noising draws come from generators
seeded by ``validation.seed``, the same at every validation, so images of successive steps differ only
by the student. Images go to ``<out_dir>/validation/step_XXXXXXX/k{k}_p{i}.png`` and to the tracker
(TensorBoard / wandb) when one is active. Runs on the main process only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .teacher import decode_latents, make_time_ids

__all__ = ["Validator", "validation_indices"]


def validation_indices(grid_size: int, k: int) -> list[int]:
    """Grid indices of k-step sampling: ``N - j N / k`` for j = 0..k-1 (rounded down)."""
    if not 1 <= k <= grid_size:
        raise ValueError(f"k={k}; allowed: 1 <= k <= N={grid_size}")
    return [grid_size - (j * grid_size) // k for j in range(k)]


class Validator:
    """``validator(step) -> folder`` writes one validation round (see the module docstring)."""

    def __init__(self, run):
        cfg = run.cfg
        v = cfg.validation
        self.run, self.cfg = run, cfg
        self.out = Path(cfg.out_dir) / "validation"
        res = v.resolution or cfg.data.resolution
        vae = run.parts.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = run.student.unet.config.in_channels
        P = len(v.prompts)
        device = run.accelerator.device
        with torch.no_grad():
            self.cond = run.parts.prompt_encoder().cond(v.prompts, make_time_ids(P, (res, res), (0, 0), (res, res),
                                                                                 device=device))
        gen = torch.Generator().manual_seed(v.seed)
        shape = (P, channels, res // factor, res // factor)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.renoise = [torch.randn(shape, generator=gen).to(device) for _ in range(max(v.steps) - 1)]
        grid = run.grid
        self.timesteps = {k: [float(grid[i]) for i in validation_indices(cfg.distill.grid_size, k)] for k in v.steps}

    @torch.no_grad()
    def __call__(self, step: int) -> tuple[Path, dict[int, torch.Tensor]]:
        from PIL import Image

        from .sample import multistep_sample

        student = self.run.student
        was_training = student.training
        student.eval()
        folder = self.out / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        images: dict[int, torch.Tensor] = {}
        try:
            with self.run.accelerator.autocast():
                for k, times in self.timesteps.items():
                    x0 = multistep_sample(student, self.run.schedule, self.noise, times, self.cond, self.renoise)
                    pixels = decode_latents(self.run.parts.vae, x0.float())
                    images[k] = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        finally:
            student.train(was_training)
        for k, batch in images.items():
            for i, img in enumerate(batch):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"k{k}_p{i}.png")
        self._to_trackers(step, images)
        return folder, images

    def _to_trackers(self, step: int, images: dict[int, torch.Tensor]) -> None:
        acc = self.run.accelerator
        for tracker in getattr(acc, "trackers", []):
            if tracker.name == "tensorboard":
                for k, batch in images.items():
                    tracker.writer.add_images(f"validation/k{k}", batch, step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({f"validation/k{k}": [wandb.Image(img.permute(1, 2, 0).numpy(), caption=p)
                                                  for img, p in zip(batch, self.cfg.validation.prompts)]
                             for k, batch in images.items()}, step=step)
