"""The loss of one SDXL distillation step, as ``odecm.training.Trainer`` calls it: ``loss_fn(step, generator)``.

Recipe (paper, LCM-LoRA-style CD / Direct CD on SDXL):

  1. this rank's samples of global step ``step`` (``sdxl.batches.BatchSource``);
  2. latents ``x_0`` (VAE posterior sample, or its mean), cond = (prompt_embeds, text_embeds, time_ids);
  3. ``n ~ U{1..N}`` per sample (or shared), ``x_{t_n} = alpha x_0 + sigma eps`` on the grid;
  4. target: CD = one CFG-teacher solver step to ``t_{n-1}``, then the target network (student under
     stop-gradient, or EMA); Direct CD = the teacher solver down to ``t_0`` (or a stored target);
  5. ``lambda(t_n) d(f_theta(x_{t_n}, t_n), target)`` (``odecm.objectives.consistency_loss``).

n, the forward noise and the VAE posterior noise are drawn for the *global* batch from the Trainer's
generator, identically on every rank, and sliced (rank r takes slots r, r + W, ...).

Adapter switching: the teacher phase (all teacher calls) runs with the LoRA off, the target and the
student with it on, so the shared UNet switches once each way per iteration (``adapter_toggles`` = 2
in the log; ``adapter_toggles_per_call`` = 2 x teacher calls is what switching around every teacher
call would cost). The adapters are on when the loss returns, as the backward pass needs.

Unreadable samples met by the step (all processes) are logged as ``data_skipped_<reason>`` (only
nonzero reasons); ``metrics.json`` holds the whole run's counts.
"""
from __future__ import annotations

from typing import Callable

import torch

from odecm.objectives import consistency_loss, draw_indices, get_distance

from .batches import batch_cond, batch_posterior

__all__ = ["make_loss_fn"]


def make_loss_fn(run) -> Callable[[int, torch.Generator], dict]:
    """``loss_fn(step, generator)`` for ``odecm.training.Trainer`` over a ``sdxl.build.Run``."""
    cfg, acc = run.cfg, run.accelerator
    d = cfg.distill
    rank, world = run.world
    B, device = d.batch_size, acc.device
    distance = get_distance(d.distance, c=d.huber_c) if d.distance == "pseudo_huber" else get_distance(d.distance)
    switch = run.switch

    def loss_fn(step: int, generator: torch.Generator) -> dict:
        toggles_before = switch.toggles if switch is not None else 0
        batch = run.source.get(step)
        mine = slice(rank, B, world)
        if cfg.data.source == "targets":  # scheme (c): stored (x_tn, n, endpoint)
            n = batch["n"].long().to(device)
            terms = consistency_loss(run.student_fn, run.provider, None, n, run.grid, run.schedule,
                                     cond=batch_cond(batch, run.parts, device), x_tn=batch["x_tn"].float().to(device),
                                     target=batch["target"].float().to(device), distance=distance,
                                     weighting=d.weighting)
        else:
            n = draw_indices(B, d.grid_size, d.index_scheme, generator)[mine].to(device)
            mean, std = batch_posterior(batch, run.parts.vae, cfg.data.vae_batch_size)
            shape = (B, *mean.shape[1:])
            vae_eps = torch.randn(shape, generator=generator)[mine].to(device)
            noise = torch.randn(shape, generator=generator)[mine].to(device)
            x0 = mean.float().to(device) + (std.float().to(device) * vae_eps if cfg.data.vae_sample else 0.0)
            cond = batch_cond(batch, run.parts, device)
            terms = consistency_loss(run.student_fn, run.provider, x0, n, run.grid, run.schedule, cond=cond,
                                     noise=noise, distance=distance, weighting=d.weighting)
        if switch is not None:
            switch.set(True)  # a checkpointed backward re-runs the student's forward: adapters on
        weighted = (terms["per_sample"] * terms["weights"]).detach()
        all_weighted = acc.gather(weighted) if world > 1 else weighted
        all_n = acc.gather(n) if world > 1 else n
        skips = run.source.last_skips if run.source.stats is not None else {}
        return {
            **{f"data_skipped_{reason}": count for reason, count in skips.items()},  # summed over processes
            "loss": terms["loss"],
            "loss_global": float(all_weighted.mean()),
            "distance": terms["distance"],
            "target_calls": terms["target_calls"],
            "target_evals": terms["target_evals"],
            "target_steps": terms["target_steps"],
            "adapter_toggles": (switch.toggles - toggles_before) if switch is not None else 0,
            "adapter_toggles_per_call": 2 * terms["target_calls"] if switch is not None else 0,
            "n_mean": float(all_n.float().mean()),
            "n_max": int(all_n.max()),
        }

    return loss_fn
