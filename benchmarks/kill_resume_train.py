"""Kill/resume targets with checkpoints: (a) the generic ``odecm.training.Trainer``, (b) ``sdxl.train``.

(a) ``trainer``: consistency distillation of a ring-of-8 Gaussian mixture (``toys.gmm``, exact teacher,
DDIM on SDXL's schedule, skip grid N = 20) into a small MLP consistency student
(``toys.networks``), EMA target (rate 0.9), AdamW with a warm-up ``LambdaLR`` and gradient clipping.
The loss draws from every RNG the Trainer restores: its generator (data, indices, noise), torch's
global RNG, NumPy's and Python's (small data jitter), so a resume that missed one would show.

(b) ``sdxl_train``: ``python -m sdxl.train --config tiny_cpu`` (tiny random SDXL-architecture UNet,
LoRA rank 4, synthetic captioned images, CD with DDIM) with ``--resume latest``.

A restart does what a user does: ``--resume latest``; if that says there is nothing to resume (the
kill came before the first checkpoint), a fresh start with ``--overwrite``.

After every kill: ``checkpoints/latest`` (when present) names a complete checkpoint (``COMPLETE``
marker, ``state.json`` of the odecm format with the step of its name, every safetensors file readable
and finite). At the end, against an uninterrupted run of the same config: the final weights (max abs
difference), the final LoRA file (sdxl), and the log (each step once, same losses).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .kill_resume_runner import fresh_entries, max_abs_diff, read_tensors

__all__ = ["trainer_worker", "sdxl_train_worker", "TRAINER", "SDXL_TRAIN", "check_latest", "kill_position",
           "logged_steps", "final_comparison"]


# --------------------------------------------------------------------------------------------- workers
def _cd_trainer(out_dir: str, train_steps: int, checkpoint_every: int, seed: int):
    """The Trainer of target (a) (see module docstring)."""
    import random

    import torch

    from odecm.grids import skip
    from odecm.objectives import CDTarget, consistency_loss, draw_indices
    from odecm.schedules import sdxl_schedule
    from odecm.training import EMATarget, Trainer, TrainerConfig
    from toys.gmm import make_preset
    from toys.networks import NetworkConfig, consistency_student, make_student

    random.seed(seed)  # a forked child starts with a freshly reseeded Python RNG; fix every global RNG
    np.random.seed(seed)
    torch.manual_seed(seed)
    schedule = sdxl_schedule(timestep_offset=1)
    grid = skip(schedule, 20)
    gmm = make_preset("ring8", 2)
    teacher = gmm.exact_denoiser(schedule)
    student = consistency_student(make_student(NetworkConfig(dim=2, width=64, depth=2), schedule, seed=seed))
    target = EMATarget(student, 0.9)
    provider = CDTarget(teacher, "ddim", grid, target)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))

    def loss_fn(step: int, gen: torch.Generator) -> dict[str, Any]:
        x0, _ = gmm.sample_p0(64, generator=gen, dtype=torch.float32)
        jitter = (1e-3 * random.random() + 1e-3 * torch.from_numpy(np.random.standard_normal(x0.shape)).float()
                  + 1e-3 * torch.randn(x0.shape))
        n = draw_indices(64, 20, generator=gen)
        return consistency_loss(student, provider, x0 + jitter, n, grid, schedule, generator=gen)

    cfg = TrainerConfig(train_steps=train_steps, checkpoint_every=checkpoint_every, keep_checkpoints=2,
                        progress=False, seed=seed, grad_clip=1.0)
    return Trainer(student, optimizer, loss_fn, out_dir, cfg, target=target, lr_scheduler=scheduler,
                   run_config={"problem": "ring8 CD", "seed": seed})


def trainer_worker(out_dir: str, train_steps: int, checkpoint_every: int, resume: bool = False,
                   overwrite: bool = False, seed: int = 0) -> None:
    """Target (a): run (``resume=False``: a fresh run, ``overwrite`` clears the folder) or resume latest.
    Run-folder and resume errors are one ``error:`` line and exit status 2 (``odecm.cli.run_main``)."""
    from odecm.cli import run_main
    from odecm.runs import prepare_run_dir

    def main(_argv):
        prepare_run_dir(out_dir, "latest" if resume else None, overwrite)
        trainer = _cd_trainer(out_dir, train_steps, checkpoint_every, seed)
        trainer.run(resume="latest" if resume else None)
        print(json.dumps({"steps": trainer.step, "segments": trainer.totals["segments"]}))

    run_main(main, [])


def sdxl_train_worker(out_dir: str, model: str, train_steps: int, checkpoint_every: int, resume: bool = False,
                      overwrite: bool = False, seed: int = 0) -> None:
    """Target (b): ``python -m sdxl.train --config tiny_cpu --set ... [--resume latest | --overwrite]``."""
    from odecm.cli import run_main
    from sdxl.train import main

    argv = ["--config", "tiny_cpu", "--set", f"out_dir={out_dir}", f"model.pretrained={model}",
            f"distill.train_steps={train_steps}", f"distill.checkpoint_every={checkpoint_every}",
            f"distill.seed={seed}", "keep_checkpoints=2", "log_with=none", "progress=false"]
    argv += ["--resume", "latest"] if resume else (["--overwrite"] if overwrite else [])
    run_main(main, argv)


# --------------------------------------------------------------------------------------------- checks
def check_latest(out: Path) -> tuple[bool, dict[str, Any]]:
    """Is the checkpoint ``latest`` names (if any) complete and usable? ``(ok, info)`` with ``info``:
    ``step`` (None: no pointer yet), ``problem`` (why not ok), ``leftovers`` (``.tmp_*``/``.pending_*``)."""
    ckdir = Path(out) / "checkpoints"
    info: dict[str, Any] = {"step": None, "problem": None,
                            "leftovers": sorted(p.name for p in ckdir.glob(".*")) if ckdir.is_dir() else []}
    pointer = ckdir / "latest"
    if not pointer.exists():
        return True, info
    name = pointer.read_text().strip()
    folder = ckdir / name
    try:
        if not (folder / "COMPLETE").is_file():
            raise ValueError(f"latest names {name!r}, which has no COMPLETE marker")
        meta = json.loads((folder / "state.json").read_text())
        if meta.get("format") != "odecm-checkpoint" or f"step_{int(meta['step']):07d}" != name:
            raise ValueError(f"{name}/state.json: format {meta.get('format')!r}, step {meta.get('step')}")
        files = sorted(folder.glob("*.safetensors"))
        if not any(f.stem == "student" for f in files) or not any(f.stem == "state" for f in files):
            raise ValueError(f"{name}: student.safetensors or state.safetensors missing")
        for f in files:
            for key, value in read_tensors(f).items():
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise ValueError(f"{name}/{f.name}: {key} is not finite")
        info["step"] = int(meta["step"])
    except (OSError, ValueError, KeyError) as err:  # safetensors raises a ValueError subclass on bad files
        info["problem"] = f"{type(err).__name__}: {err}"
        return False, info
    return True, info


def kill_position(out: Path, since: float) -> str:
    """Where a kill landed, from what the killed worker (active since ``since``, ``time.time()``) left:
    a checkpoint being written, one written but not yet verified by a finite loss, or neither."""
    ckdir = Path(out) / "checkpoints"
    if fresh_entries(ckdir, since, lambda n: n.startswith(".tmp_step_")):
        return "mid_write"
    if fresh_entries(ckdir, since, lambda n: n.startswith(".pending_")):
        return "pending"
    return "other"


def logged_steps(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            rows.append({"step": None})
    return rows


def _final_weights(out: Path) -> dict[str, np.ndarray]:
    folder = Path(out) / "checkpoints" / (Path(out) / "checkpoints" / "latest").read_text().strip()
    weights = {f"student/{k}": v for k, v in read_tensors(folder / "student.safetensors").items()}
    if (folder / "target.safetensors").exists():
        weights.update({f"target/{k}": v for k, v in read_tensors(folder / "target.safetensors").items()})
    return weights


def final_comparison(out: Path, reference: Path, train_steps: int, lora: bool) -> dict[str, Any]:
    """The finished run in ``out`` against the uninterrupted one in ``reference``."""
    result: dict[str, Any] = {"problems": []}
    ok, info = check_latest(out)
    if not ok or info["step"] != train_steps:
        result["problems"].append(f"latest: step {info['step']} (want {train_steps}) {info['problem'] or ''}")
        result["max_abs_weight_diff"] = float("inf")
    else:
        result["max_abs_weight_diff"] = max_abs_diff(_final_weights(out), _final_weights(reference))
    if lora:
        name = "lora/pytorch_lora_weights.safetensors"
        try:
            result["max_abs_lora_diff"] = max_abs_diff(read_tensors(out / name), read_tensors(reference / name))
        except Exception as err:  # noqa: BLE001 -- a missing or truncated file is the finding
            result["max_abs_lora_diff"] = float("inf")
            result["problems"].append(f"final LoRA {name}: {type(err).__name__}: {str(err)[:120]}")
    steps = [r.get("step") for r in logged_steps(out)]
    if steps != list(range(1, train_steps + 1)):
        result["problems"].append(f"log.jsonl steps {steps} (want 1..{train_steps} once each)")
    ref_loss = {r["step"]: r.get("loss") for r in logged_steps(reference)}
    diffs = [abs(r["loss"] - ref_loss[r["step"]]) for r in logged_steps(out)
             if r.get("step") in ref_loss and r.get("loss") is not None and ref_loss[r["step"]] is not None]
    result["max_abs_loss_diff"] = max(diffs) if diffs else float("inf")
    return result


# --------------------------------------------------------------------------------------------- targets
#: (a) the generic Trainer: 80 steps, a checkpoint every 4
TRAINER = {"name": "trainer", "spec": "benchmarks.kill_resume_train:trainer_worker", "lora": False,
           "kwargs": {"train_steps": 80, "checkpoint_every": 4}}
#: (b) sdxl.train on the tiny CPU model: 6 steps, a checkpoint every step
SDXL_TRAIN = {"name": "sdxl_train", "spec": "benchmarks.kill_resume_train:sdxl_train_worker", "lora": True,
              "kwargs": {"train_steps": 6, "checkpoint_every": 1}}
