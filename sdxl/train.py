"""SDXL consistency distillation (CD) and Direct CD through odecm's one core.

    python -m sdxl.train --config cd_ddim --set data.path=DATA [--resume latest] [--overwrite]
    accelerate launch --num_processes 8 -m sdxl.train --config cd_ddim ...        # several GPUs
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m sdxl.train --config tiny_cpu   # two CPU processes

A run, in order:

  1. config (``--config`` + ``--set``) and the accelerator; the checks at the door (``sdxl.checks``):
     every config problem is one ``error:`` line, before any model loads or any folder is made;
  2. the run folder (``odecm.runs.prepare_run_dir``): a fresh run needs a new or empty ``out_dir``
     (``--overwrite`` clears one first); ``--resume latest`` needs a checkpoint of this run, and the
     config may differ from the checkpoint's only as ``sdxl.train_config.RESUME_POLICY`` allows
     (``--allow-change KEY`` accepts a refused key, with a logged note); a run already at
     ``distill.train_steps`` is reported finished and left untouched, unless its final outputs (step 4)
     are missing or incomplete (killed after its last checkpoint): then they are written from that checkpoint;
  3. ``sdxl.build.build_run`` (weights, LoRA student on the teacher's UNet, target, provider, optimizer),
     then ``odecm.training.Trainer`` with the loss of ``sdxl.loss``: NaN/inf guard decided on all
     ranks at once, fp16 through the grad scaler, checkpoints published only after a finite loss;
  4. outputs in ``out_dir``: ``config.json`` (replayable), ``log.jsonl`` (per step), ``tensorboard/``
     (``log_with``), ``validation/step_XXXXXXX/`` (``validation.every``), ``checkpoints/``, the student
     (``lora/`` in diffusers' format, or ``student/unet/``; filled under a temporary name, marked
     ``COMPLETE`` with its step and renamed into place) and ``metrics.json`` describing the whole
     run across resumes (written atomically); the end prints where each is and a one-line summary.

Randomness: the run's seed fixes the LoRA initialisation, the data order, n, the forward noise and
the VAE posterior noise (all drawn for the global batch), so W processes with global batch B equal one
process with B, and ``--resume latest`` continues the same stream.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from odecm.checkpoint import latest_checkpoint, read_meta
from odecm.cli import add_config_args, launch_world_size, overrides_from, provenance, report_check, run_main
from odecm.config import config_to_dict, save_config
from odecm.runs import check_resume_config, prepare_run_dir, resolve_resume
from odecm.training import NonFiniteLossError, Trainer, TrainerConfig

from odecm.atomic import atomic_folder, write_json_atomic
from .build import Run, build_run, make_accelerator, resolve_log_with
from .checks import check_config
from .loss import make_loss_fn
from .train_config import RESUME_POLICY, SDXLTrainConfig, load_train_config

__all__ = ["train", "main", "parse_args", "door_checks", "SDXLTrainer", "resume_point", "run_metrics", "trainer_config", "missing_outputs",
           "save_student", "student_folder", "STUDENT_COMPLETE"]


class SDXLTrainer(Trainer):
    """``odecm.training.Trainer`` plus, after every step: the step's scalars to the accelerate trackers,
    the data skip counts into ``run_info`` (so checkpoints carry them across resumes) and a
    validation round every ``validation.every`` steps."""

    def __init__(self, *args, run: Run, validator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_ref, self.validator = run, validator

    def train_step(self) -> dict[str, Any]:
        record = super().train_step()
        acc, stats = self.run_ref.accelerator, self.run_ref.source.stats
        if stats is not None:
            self.run_info["data_skips"] = stats.vector().tolist()
        if getattr(acc, "trackers", None):
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                    step=self.step)
        every = self.run_ref.cfg.validation.every
        if self.validator is not None and every and self.step % every == 0 and self.is_main:
            folder, _ = self.validator(self.step)
            record["validation"] = str(folder)
        return record


def trainer_config(cfg: SDXLTrainConfig) -> TrainerConfig:
    d = cfg.distill
    return TrainerConfig(train_steps=d.train_steps, grad_clip=d.optim.grad_clip, log_every=cfg.log_every,
                         checkpoint_every=d.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                         max_nonfinite=d.max_nonfinite, seed=d.seed, progress=cfg.progress)


def resume_point(cfg: SDXLTrainConfig, resume: str | None, allow_change: Sequence[str] = ()) -> dict | None:
    """The checkpoint meta a ``--resume`` continues from (None for a fresh run), after checking, before
    anything loads, that the config differs from the checkpoint's only as ``RESUME_POLICY`` allows."""
    if resume in (None, ""):
        return None
    meta = read_meta(resolve_resume(cfg.out_dir, resume))
    # the run config holds every loop setting (the Trainer checks those again when it loads)
    meta["resume_notes"] = check_resume_config(meta.get("config") or {}, config_to_dict(cfg), RESUME_POLICY,
                                               allow_change)
    return meta


def _read_log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_metrics(cfg: SDXLTrainConfig, trainer: Trainer, run: Run, segment: dict) -> dict:
    """``metrics.json``: the whole run (every segment across resumes, read from the log and the
    Trainer's totals), this segment, the data skip counts and where the outputs are."""
    out = Path(cfg.out_dir)
    log = [r for r in _read_log(out) if "loss" in r]
    finite = [r["loss_global"] for r in log if r.get("loss_global") is not None and r["loss_global"] == r["loss_global"]]
    times = [r["time_s"] for r in log if "time_s" in r]
    s_it = statistics.median(times) if times else None
    mean = (lambda key: sum(r.get(key, 0) for r in log) / len(log) if log else None)
    totals = trainer.totals
    stats = run.source.stats
    # the counts as of the last training step (the Trainer's final check of the weights reads one more batch)
    _restore_skip_stats(stats, trainer.run_info.get("data_skips"))
    return {
        "steps": totals["steps"], "train_steps": cfg.distill.train_steps, "optimizer_steps": totals["optimizer_steps"],
        "skipped_nonfinite": totals["skipped_nonfinite"], "overflow_skips": totals["overflow_skips"],
        "segments": totals["segments"], "wall_seconds": totals["wall_seconds"],
        "final_loss": finite[-1] if finite else None,
        "mean_loss": sum(finite) / len(finite) if finite else None,
        "seconds_per_iteration": s_it,  # median over the logged steps of the whole run
        "images_per_second": cfg.distill.batch_size / s_it if s_it else None,
        "mean_teacher_calls_per_iteration": mean("target_calls"),
        "adapter_toggles_per_iteration": mean("adapter_toggles"),
        "adapter_toggles_per_iteration_if_toggled_per_call": mean("adapter_toggles_per_call"),
        "world_size": run.accelerator.num_processes, "device": str(run.accelerator.device),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "this_segment": segment,
        "data": stats.summary() if stats is not None else None,
        "outputs": outputs(cfg, run.student.kind),
    }


def outputs(cfg: SDXLTrainConfig, kind: str) -> dict[str, str | None]:
    out = Path(cfg.out_dir)
    latest = latest_checkpoint(out)
    student = (out / "lora" / "pytorch_lora_weights.safetensors") if kind == "lora" else (out / "student" / "unet")
    return {"student": str(student) if cfg.save_student else None, "checkpoints": str(out / "checkpoints"),
            "latest_checkpoint": str(latest) if latest else None, "log": str(out / "log.jsonl"),
            "tensorboard": str(out / "tensorboard") if resolve_log_with(cfg) == "tensorboard" else None,
            "validation": str(out / "validation") if cfg.validation.every else None,
            "metrics": str(out / "metrics.json"), "config": str(out / "config.json")}


def summary_lines(metrics: dict) -> list[str]:
    """Where everything is, then one line: steps, s/it, final loss."""
    o = metrics["outputs"]
    s_it, loss = metrics["seconds_per_iteration"], metrics["final_loss"]
    lines = [f"[sdxl.train] {metrics['steps']} steps ({metrics['this_segment']['steps']} this run), "
             f"{s_it:.3g} s/it, final loss {loss:.6g}" if s_it is not None and loss is not None
             else f"[sdxl.train] {metrics['steps']} steps"]
    names = (("student", "student"), ("checkpoints", "latest_checkpoint"), ("log", "log"), ("tensorboard", "tensorboard"),
             ("validation", "validation"), ("metrics", "metrics"))
    lines += [f"  {label + ':':<13}{o[key]}" for label, key in names if o.get(key)]
    return lines


def _restore_skip_stats(stats, vector: list[int] | None) -> None:
    """Replace ``stats``' counts with a checkpoint's (its examples of names stay this segment's)."""
    if stats is None or not vector:
        return
    stats.delivered = 0
    stats.by_reason = dict.fromkeys(stats.by_reason, 0)
    stats.add_vector(vector)


def _init_trackers(cfg: SDXLTrainConfig, acc) -> None:
    if not resolve_log_with(cfg):
        return
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    walk(config_to_dict(cfg))
    acc.init_trackers("tensorboard", config=flat)


#: the marker a student folder gets last, before it is renamed into place: ``{"step", "run_id"}``
STUDENT_COMPLETE = "COMPLETE"


def student_folder(cfg: SDXLTrainConfig) -> Path:
    """``<out_dir>/lora`` (LoRA student) or ``<out_dir>/student`` (full UNet)."""
    return Path(cfg.out_dir) / ("lora" if cfg.student.kind == "lora" else "student")


def missing_outputs(cfg: SDXLTrainConfig, step: int) -> list[str]:
    """What a run finished at ``step`` lacks of its final outputs (empty: all there and complete): the
    student folder with its ``COMPLETE`` marker for this step and its weights, and ``metrics.json`` of
    this step."""
    out, missing = Path(cfg.out_dir), []
    if cfg.save_student:
        folder = student_folder(cfg)
        weights = folder / ("pytorch_lora_weights.safetensors" if cfg.student.kind == "lora" else "unet")
        try:
            marked = json.loads((folder / STUDENT_COMPLETE).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            marked = None
        if marked != step or not weights.exists():
            missing.append(f"{folder.name}/ " + ("missing" if not folder.exists() else
                                                 f"incomplete (no {STUDENT_COMPLETE} marker of step {step})"))
    try:
        done = json.loads((out / "metrics.json").read_text()).get("steps") == step
    except (OSError, ValueError, AttributeError):
        done = False
    if not done:
        missing.append(f"metrics.json {'missing' if not (out / 'metrics.json').exists() else 'not of this step'}")
    return missing


def save_student(cfg: SDXLTrainConfig, run: Run, step: int, run_id: str | None) -> Path:
    """The student in diffusers' format plus ``odecm_student.json``, written into a temporary folder that
    gets ``COMPLETE`` last and is then renamed into place (``odecm.atomic.atomic_folder``): a kill leaves
    no folder, the previous one, or the complete new one."""
    from .student import write_student_info

    folder = student_folder(cfg)
    with atomic_folder(folder) as tmp:
        run.student.save(tmp)
        write_student_info(tmp, cfg)
        (tmp / STUDENT_COMPLETE).write_text(json.dumps({"step": step, "run_id": run_id}))
    return folder


def _make_trainer(cfg: SDXLTrainConfig, acc, run: Run, out: Path, allow_change: Sequence[str],
                  validator=None) -> SDXLTrainer:
    return SDXLTrainer(run.student_fn, run.optimizer, make_loss_fn(run), out, trainer_config(cfg), target=run.target,
                       lr_scheduler=run.lr_scheduler, accelerator=acc, student_state=lambda m: m.trainable_state(),
                       params=run.student.parameters(), run_config=config_to_dict(cfg), resume_policy=RESUME_POLICY,
                       allow_change=allow_change, run=run, validator=validator,
                       run_info={"world_size": acc.num_processes, "method": cfg.distill.method,
                                 "solver": cfg.distill.solver})


def _write_outputs(cfg: SDXLTrainConfig, acc, run: Run, trainer: Trainer, segment: dict) -> dict:
    """The student folder (atomically), ``metrics.json`` (atomically) and the summary, on the main process."""
    acc.wait_for_everyone()
    metrics: dict[str, Any] = {}
    if acc.is_main_process:
        if cfg.save_student:
            save_student(cfg, run, trainer.step, trainer.run_id)
        metrics = run_metrics(cfg, trainer, run, segment)
        write_json_atomic(Path(cfg.out_dir) / "metrics.json", metrics)
        print("\n".join(summary_lines(metrics)), flush=True)
    acc.wait_for_everyone()
    return metrics


def _rewrite_outputs(cfg: SDXLTrainConfig, acc, meta: dict, resume: str, allow_change: Sequence[str]) -> dict:
    """A finished run whose final outputs are missing or incomplete (killed after its last checkpoint):
    load that checkpoint and write them; no training step, no config.json rewrite."""
    t0 = time.perf_counter()
    run = build_run(cfg, acc)
    _restore_skip_stats(run.source.stats, (meta.get("run_info") or {}).get("data_skips"))
    trainer = _make_trainer(cfg, acc, run, Path(cfg.out_dir), allow_change)
    trainer.resume(resume)
    segment = {"resumed_from_step": trainer.step, "steps": 0, "wall_seconds": time.perf_counter() - t0,
               "resume_changes": meta["resume_notes"], "outputs_rewritten": True}
    return _write_outputs(cfg, acc, run, trainer, segment)


def door_checks(cfg: SDXLTrainConfig, world_size: int, resume: str | None = None, overwrite: bool = False,
                allow_change: Sequence[str] = ()) -> dict | None:
    """The checks before anything loads or is written (``sdxl.checks.check_config``, ``--resume`` against its
    checkpoint, ``out_dir``); returns ``resume_point``'s meta. ``--check`` runs exactly these."""
    check_config(cfg, world_size, command="train")
    meta = resume_point(cfg, resume, allow_change)
    prepare_run_dir(cfg.out_dir, resume, overwrite, is_main=False)
    return meta


def train(cfg: SDXLTrainConfig, resume: str | None = None, accelerator=None, overwrite: bool = False,
          allow_change: Sequence[str] = ()) -> dict:
    """Run (or resume) a distillation; returns the metrics written to ``<out_dir>/metrics.json``.

    Resuming a run already at ``distill.train_steps``: with its final outputs complete (``missing_outputs``)
    nothing is done; otherwise they are written from its final checkpoint."""
    acc = accelerator or make_accelerator(cfg, trackers=True)
    meta = door_checks(cfg, acc.num_processes, resume, overwrite, allow_change)
    out = prepare_run_dir(cfg.out_dir, resume, overwrite, is_main=acc.is_main_process)
    acc.wait_for_everyone()
    if meta is not None and int(meta["step"]) >= cfg.distill.train_steps:
        step, missing = int(meta["step"]), missing_outputs(cfg, int(meta["step"]))
        if not missing:
            if acc.is_main_process:
                print(f"[sdxl.train] the run in {out} is already finished (step {step} of distill.train_steps="
                      f"{cfg.distill.train_steps}); nothing done, its outputs are unchanged. Raise "
                      "distill.train_steps to continue it.", flush=True)
            return json.loads((out / "metrics.json").read_text())
        if acc.is_main_process:
            print(f"[sdxl.train] the run in {out} is finished (step {step}) but its final outputs are not all "
                  f"there ({'; '.join(missing)}): writing them from its checkpoint of step {step}.", flush=True)
        return _rewrite_outputs(cfg, acc, meta, resume, allow_change)
    notes = meta["resume_notes"] if meta else []
    if acc.is_main_process:
        prov = provenance()
        if meta is not None:
            prov.update(resumed_from_step=int(meta["step"]), resume_changes=notes)
        save_config(cfg, out / "config.json", provenance=prov)
    run = build_run(cfg, acc)
    validator = None
    if cfg.validation.every and acc.is_main_process:
        from .validation import Validator

        validator = Validator(run)
    _init_trackers(cfg, acc)
    if meta is not None:
        _restore_skip_stats(run.source.stats, (meta.get("run_info") or {}).get("data_skips"))
    trainer = _make_trainer(cfg, acc, run, out, allow_change, validator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, t0 = int(meta["step"]) if meta else 0, time.perf_counter()
    try:
        history = trainer.run(resume=resume)
    finally:  # not acc.end_training(): it also destroys the process group, which the rest still needs
        for tracker in getattr(acc, "trackers", []):
            tracker.finish()
    segment = {"resumed_from_step": start, "steps": len(history), "wall_seconds": time.perf_counter() - t0,
               "resume_changes": notes}
    return _write_outputs(cfg, acc, run, trainer, segment)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdxl.train", description="SDXL CD / Direct CD distillation")
    add_config_args(p, "YAML/JSON file or a name in sdxl/configs (cd_ddim, direct_cd_heun_vp, tiny_cpu ...)")
    p.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                   help="continue this out_dir's run: 'latest' or one of its checkpoint folders")
    p.add_argument("--overwrite", action="store_true", help="delete out_dir's contents first (a fresh run)")
    p.add_argument("--allow-change", dest="allow_change", action="append", default=[], metavar="KEY",
                   help="with --resume: accept a change of KEY (e.g. distill.optim.lr), logged; repeatable")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_train_config(args.config, overrides_from(args))
    if report_check(args, "sdxl.train", cfg, door=lambda: door_checks(
            cfg, launch_world_size(), args.resume, args.overwrite, args.allow_change)):
        return None
    try:
        return train(cfg, resume=args.resume, overwrite=args.overwrite, allow_change=args.allow_change)
    except NonFiniteLossError as err:  # the run stopped itself; its last good checkpoint is intact
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_main(main)
