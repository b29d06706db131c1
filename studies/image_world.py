"""The image world (issue 14): CD vs Direct CD on real images, each suspect of the paradox a switch.

``python -m studies.image_world [--quick] [--config FILE] [--set key=value ...] [--out DIR] [--threads N]``

Sweep: method {cd, direct_cd} x teacher {exact, learned} x space {pixel, latent} x student
{scratch, lora, mlp} x solver {ddim, euler, heun, euler_vp, heun_vp} x seeds (``toys.image_world``).
``lora`` pairs only with the learned teacher; (exact, lora) cells are skipped and listed as such.
World: scikit-learn's digits (8x8, [-1, 1], 20% held out), SDXL's discrete schedule in the paper's
indexing (``timestep_offset=1``, t_0 = 0 is clean data), the LCM skip grid with N = ``grid_size``, LCM
boundary scalings, the CD target the online student under stop-gradient, plain L2.

Each seed varies the student initialisation, the batch order, the training-pair pool (CD and Direct
CD share it: ``toys.image_world.training.build_pool``), the evaluation noise and its labels. Held
fixed (recorded in ``metrics.json["held_fixed"]``): the data split, the classifier, the autoencoder
and the learned teachers (each cached under ``$ODECM_CACHE_DIR/image_world``).

Per student member (one-step samples ``f(x_T, T)`` from the seed's ``x_T ~ p_T``): E against the
teacher's solver chain and against the exact ODE, in the ODE's space and in pixels; Fréchet distance
of classifier features to the teacher's samples from the same ``x_T`` (the paper's protocol) and to
held-out images; precision / recall; class-histogram TV; memorisation; shrinkage (variance and
high-frequency power ratios against the teacher's samples). E and FD also at intermediate budgets.
Paired differences over seeds and corrected regime verdicts come from ``studies.stats``.

Outputs (when ``out_dir`` is given): ``config.json``, ``metrics.json``, ``table.md``, ``samples.png``,
``metrics_vs_budget.png``, ``shrinkage.png``, ``teacher_score_error.png`` (+ PDFs).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, model_validator

from odecm.cli import InputError, run_main
from odecm.config import StrictModel
from toys.image_world.autoencoder import AutoencoderConfig
from toys.image_world.classifier import ClassifierConfig
from toys.image_world.data import DataConfig
from toys.image_world.students import StudentConfig
from toys.image_world.teachers import GuidanceConfig, LearnedTeacherConfig
from toys.image_world.training import TrainConfig

from . import common

STUDY = "image_world"
SOLVER_NAMES = ("ddim", "euler", "heun", "euler_vp", "heun_vp")


class EvalConfig(StrictModel):
    num_samples: int = Field(500, ge=20, description="evaluation noises x_T per seed")
    budgets: list[int] | None = Field(None, description="steps at which E and FD are also measured (None: 1/4, 1/2, 1 of train_steps)")
    memorisation_threshold: float = Field(0.1, gt=0, description="RMS pixel distance (in [-1, 1] units) counted as a copy")
    seed: int = 777
    ode_rtol: float = Field(1e-5, gt=0, description="dopri5 tolerance of the exact ODE (float64)")
    score_error_samples: int = Field(256, ge=8)
    score_error_times: int = Field(12, ge=2)
    floor_draws: int = Field(10, ge=10, description="draws of the finite-sample FD floor (a distribution)")
    grid_images: int = Field(10, ge=1, description="samples per row in samples.png")


class ImageWorldConfig(StrictModel):
    data: DataConfig = DataConfig()
    grid_size: int = Field(20, ge=1, description="N grid intervals of the skip grid (must divide 1000)")
    methods: list[Literal["cd", "direct_cd"]] = ["cd", "direct_cd"]
    teachers: list[Literal["exact", "learned"]] = ["exact", "learned"]
    spaces: list[Literal["pixel", "latent"]] = ["pixel", "latent"]
    students: list[Literal["scratch", "lora", "mlp"]] = ["scratch", "lora"]
    solvers: list[Literal["ddim", "euler", "heun", "euler_vp", "heun_vp"]] = ["ddim"]
    seeds: list[int] = [0, 1, 2]
    guidance: GuidanceConfig | None = Field(None, description="null: unconditional; else class-conditional teacher with CFG")
    teacher: LearnedTeacherConfig = LearnedTeacherConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, description="torch intra-op threads (cpu; 1 was fastest on the shared 2-core machine)")
    cache_dir: str | None = Field(None, description="model cache root (default $ODECM_CACHE_DIR or ~/.cache/odecm)")
    use_cache: bool = True
    plots: bool = True

    @model_validator(mode="after")
    def _check(self):
        if 1000 % self.grid_size:
            raise ValueError(f"grid_size={self.grid_size} must divide 1000 (the skip grid); e.g. 10, 20, 50, 100")
        for name in ("methods", "teachers", "spaces", "students", "solvers", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} is empty")
            if len(set(values)) != len(values):
                raise ValueError(f"{name}={values} has duplicates")
        if "mlp" in self.students and self.guidance is not None:
            raise ValueError("students: 'mlp' is unconditional; allowed with guidance: null only")
        if self.eval.budgets is not None and any(b < 1 or b > self.train.train_steps for b in self.eval.budgets):
            raise ValueError(f"eval.budgets={self.eval.budgets}; allowed: steps in 1..train.train_steps={self.train.train_steps}")
        return self

    def budgets(self) -> list[int]:
        S = self.train.train_steps
        return sorted(set(self.eval.budgets or [max(1, S // 4), max(1, S // 2), S]) | {S})


#: the reduced sweep (smoke run; never evidence). Leaves every cache-determining key alone, so the
#: default run's cached classifier, autoencoder and teachers serve it.
QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "train": {"train_steps": 20, "batch_size": 8, "pool_size": 256, "warmup_steps": 2, "log_every": 5},
    "eval": {"num_samples": 48, "score_error_samples": 32, "score_error_times": 4, "ode_rtol": 1e-4, "grid_images": 6},
}


def cells(cfg: ImageWorldConfig) -> tuple[list[tuple[str, str, str, str]], list[dict[str, str]]]:
    """``(space, teacher, student, solver)`` cells to train, and the skipped ones with the reason."""
    run, skipped = [], []
    for space in cfg.spaces:
        for teacher in cfg.teachers:
            for student in cfg.students:
                for solver in cfg.solvers:
                    if student == "lora" and teacher != "learned":
                        skipped.append({"space": space, "teacher": teacher, "student": student, "solver": solver,
                                        "reason": "lora starts from the learned teacher's network; the exact teacher has none"})
                    else:
                        run.append((space, teacher, student, solver))
    return run, skipped


def check_at_the_door(cfg: ImageWorldConfig) -> None:
    """Checks that need the environment (before any model loads or folder is made)."""
    from odecm.solvers import SOLVERS

    missing = [s for s in cfg.solvers if s not in SOLVERS]
    if missing:
        raise InputError(f"solvers: {missing} not in odecm.solvers (allowed now: {sorted(SOLVERS)})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' but torch.cuda.is_available() is False (allowed here: 'cpu')")


def run(cfg: ImageWorldConfig, out_dir: str | Path | None = None, progress: bool = True, quick: bool = False) -> dict[str, Any]:
    """Run the sweep; with ``out_dir`` write metrics / table / plots there (nothing but the model caches
    is written when ``out_dir`` is None). Returns the metrics dict."""
    from .image_world_run import execute

    check_at_the_door(cfg)
    metrics = execute(cfg, progress=progress, quick=quick)
    if out_dir is not None:
        from .image_world_report import write_outputs

        write_outputs(Path(out_dir), cfg, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(STUDY, argv, description=__doc__.split("\n")[0])
    cfg = common.resolve_config(ImageWorldConfig, args, quick=QUICK)
    cfg = common.apply_run_flags(cfg, args)
    check_at_the_door(cfg)
    out = common.results_folder(STUDY, args, create=not args.check)
    if common.report_check(args, f"studies.{STUDY}", cfg):
        return None
    common.save_config(out, cfg, argv=argv if argv is not None else sys.argv[1:], quick=bool(args.quick))
    start = time.perf_counter()
    metrics = run(cfg, out, progress=args.progress, quick=bool(args.quick))
    print((out / "table.md").read_text())
    print(f"\nresults in {out} ({time.perf_counter() - start:.0f} s)")
    return metrics


if __name__ == "__main__":
    run_main(main)
