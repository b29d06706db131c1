"""Score approximation (explanation 1): how does the teacher's score error change CD vs Direct CD?

``python -m studies.score_error [--quick] [--config FILE] [--set key=value ...] [--out DIR]``
``metrics = studies.score_error.run(cfg)`` (Python; ``out_dir=None`` writes nothing)

Sweep: teachers (``toys.scores.make_teacher``: the exact GMM denoiser, ``wrong_gmm`` at several
deltas, a DSM-``learned`` MLP) x method {cd, direct_cd} x teacher solver {ddim, euler_vp, heun_vp}
(the paper's DDIM, Euler and Heun; EDM's ``euler`` / ``heun`` stay selectable, EDM Euler being DDIM in
exact arithmetic) x seeds, on ``ring8`` with the SDXL noise schedule in the paper's indexing
(``timestep_offset=1``: the grid 0, 50, ..., 1000 ends at clean data). All students of one method
train at once as one batched ensemble (``toys.ensemble``; member = (teacher, solver, seed)).

Seeds (``studies.seeding``): seed s gives its members their own initialisation, batch order, Direct CD
target pool, evaluation noise, reference samples and, for learned teachers, teacher training seed
(``seeding.hold_fixed`` holds any of them). CD and Direct CD members of one (teacher, solver, seed)
share all of them: the methods are compared in pairs.

Per trained student, from its seed's evaluation noise ``x_T ~ p_T`` (``T = t_N``):

* ``E_solver``: paper eq. 6, ``mean |f_theta(x_T, T) - f_solver(x_T, T, t_0)|^2`` against the teacher's
  own solver chain (the target Direct CD regresses on);
* ``E_teacher_ode`` / ``E_true_ode``: the same against the teacher's exact PF-ODE and the TRUE PF-ODE
  (adaptive dopri5, float64);
* sample quality (``toys.metrics.sample_quality``, with shrinkage) against the teacher's exact-ODE samples
  from independent noise (``*_teacher``, the **primary** comparison, the paper's FID-vs-teacher) and
  against ``p_0`` (``*_p0``, the second question);
* the mechanism (``studies.stats.error_decomposition``): ``student - true = (teacher - true) + (student
  - teacher)``, the correlation of the teacher's error and the student's own error (``mech_*``; < 0:
  the student's misfit points back toward the truth). Not defined for the exact teacher.

Results: ``config.json``, ``metrics.json`` (``studies.evidence`` schema plus ``runs``, ``references``,
``teachers``), ``table.md``, ``samples.png`` and ``metrics_vs_score_error.png`` (+ PDF), and with
``curves.enabled`` ``curves.png``; tables and figures come from ``studies.score_error_report``.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from tqdm.auto import tqdm

from odecm.cli import run_main
from odecm.config import SolverName, StrictModel
from toys.ensemble import Route, TrainConfig, init_from_teacher, make_ensemble_student, train_ensemble
from toys.networks import NetworkConfig

from . import common, evidence
from .cells import log
from .cells_world import GridChecked
from .curves import CurveConfig, CurveRecorder, TrainedStudyConfig, check_curve_budget
from .score_error_world import (PRIMARY, QUALITY_KEYS, SECONDARY, TEACHER_QUALITY_KEYS, SeedData,  # noqa: F401
                                TeacherWorld, World, curve_eval, errors, member_row, quality, teacher_ode)
from .seeding import SeedConfig

Tensor = torch.Tensor
STUDY = "score_error"
#: the metrics ``curves.keys`` may keep along training (``score_error_world.curve_eval``)
CURVE_KEYS = ("E_solver", "E_teacher_ode", "E_true_ode", "w2_p0", "mmd2_p0", "w2_teacher", "mmd2_teacher",
              "mech_correlation")


class TeacherSpec(StrictModel):
    """One teacher of the sweep: ``make_teacher(kind, gmm, schedule, **options)``. ``seed`` fixes a
    ``wrong_gmm``'s perturbation (the teacher under study); a ``learned`` teacher's training seed is the
    run seed's ``teacher`` source (``seed`` when that source is held fixed)."""

    label: str
    kind: Literal["exact", "wrong_gmm", "nonconservative", "learned"]
    delta: float | None = Field(None, ge=0, description="wrong_gmm / nonconservative size")
    budget: int | None = Field(None, ge=0, description="learned: DSM training steps")
    seed: int = 0

    @model_validator(mode="after")
    def _knob_of_its_kind(self):
        if self.delta is not None and self.kind not in ("wrong_gmm", "nonconservative"):
            raise PydanticCustomError("knob", f"delta={self.delta} applies to kinds 'wrong_gmm' / 'nonconservative' "
                                              f"only (kind={self.kind!r}); allowed here: null")
        if self.budget is not None and self.kind != "learned":
            raise PydanticCustomError("knob", f"budget={self.budget} applies to kind 'learned' only "
                                              f"(kind={self.kind!r}); allowed here: null")
        return self

    @property
    def family(self) -> str:
        return self.kind

    def options(self, teacher_seed: int | None = None) -> dict[str, Any]:
        if self.kind in ("wrong_gmm", "nonconservative"):
            return {"delta": 0.1 if self.delta is None else self.delta,
                    **({"seed": self.seed} if self.kind == "wrong_gmm" else {})}
        if self.kind == "learned":
            return {"budget": 2000 if self.budget is None else self.budget,
                    "seed": self.seed if teacher_seed is None else int(teacher_seed)}
        return {}


class EvalSettings(StrictModel):
    num_samples: int = Field(2000, ge=10, description="evaluation noise x_T (and reference) sample size")
    max_points: int = Field(800, ge=10, description="subsample for W2 / MMD / k-NN metrics")
    seed: int = Field(777, description="seed of metric subsampling and the floor draws")
    ode_rtol: float = Field(1e-6, gt=0)
    ode_atol: float = Field(1e-8, gt=0)
    score_error_samples: int = Field(2048, ge=16, description="points per timestep for toys.scores.score_error")
    quality_vs_teacher: bool = True
    floor: bool = Field(True, description="finite-sample floors of the metrics (two independent samples)")
    floor_draws: int = Field(10, ge=10, description="draws of each floor (a distribution)")
    n_resamples: int = Field(1000, ge=100, description="bootstrap resamples over evaluation samples")
    convergence_check: bool = Field(True, description="also evaluate E at half the budget (convergence flag)")
    mechanism: bool = Field(True, description="error decomposition student/teacher/true ODE per member")


class ScoreErrorConfig(GridChecked, TrainedStudyConfig):
    CURVE_KEYS = CURVE_KEYS
    renamed_keys = {"num_steps": "grid_size"}

    quick: bool = Field(False, description="a smoke run (set by --quick): never evidence")
    preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso"] = "ring8"
    schedule: Literal["sdxl", "vp", "vp_cosine", "edm"] = "sdxl"
    timestep_offset: Literal[0, 1] = Field(1, description="sdxl: 1 = the paper's indexing (grid ends at clean "
                                                          "data), 0 = diffusers' (ends at timestep 0)")
    grid: Literal["skip", "uniform", "karras"] = Field("skip", validate_default=True)
    grid_size: int = Field(20, ge=1, validate_default=True, description="N grid intervals (skip needs N | 1000)")
    boundary: Literal["lcm", "edm"] = "lcm"
    teachers: list[TeacherSpec] = Field(default_factory=lambda: [
        TeacherSpec(label="exact", kind="exact"),
        TeacherSpec(label="wrong_gmm(0.3)", kind="wrong_gmm", delta=0.3),
        TeacherSpec(label="learned(2000)", kind="learned", budget=2000),
    ], description="the default keeps the main job under 10 min on 2 cores; more teachers: configs/score_error_full.yaml")
    methods: list[Literal["cd", "direct_cd"]] = ["cd", "direct_cd"]
    solvers: list[SolverName] = ["ddim", "euler_vp", "heun_vp"]
    seeds: list[int] = [0, 1, 2]
    seeding: SeedConfig = SeedConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, lr=2e-3, lr_schedule="cosine",
                                     pool_size=65536)
    inits: list[Literal["scratch", "teacher"]] = Field(default_factory=lambda: ["scratch"],
                                                       description="student initialisations (teacher: init_steps "
                                                                   "of regression onto the teacher's denoiser)")
    init_steps: int = Field(1000, ge=1, description="regression steps of init 'teacher' (toys.ensemble.init_from_teacher)")
    eval: EvalSettings = EvalSettings()
    curves: CurveConfig = CurveConfig(keys=["E_solver", "E_true_ode", "w2_teacher", "w2_p0", "mech_correlation"])
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    plots: bool = True

    @field_validator("methods", "solvers", "seeds", "inits")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return common.distinct(v)

    @field_validator("teachers")
    @classmethod
    def _distinct_labels(cls, v: list[TeacherSpec]) -> list[TeacherSpec]:
        labels = [t.label for t in v]
        if len(set(labels)) != len(labels):
            raise PydanticCustomError("listed_twice", f"labels {labels}: a label listed twice; allowed: distinct labels")
        return common.distinct(v)

    @model_validator(mode="after")
    def _check(self):
        check_curve_budget(self.curves, self.train)
        return self


#: ``--quick``: a reduced sweep, a smoke run (< 1 min on 2 shared cores)
QUICK: dict[str, Any] = {
    "quick": True,
    "teachers": [{"label": "exact", "kind": "exact"},
                 {"label": "wrong_gmm(0.3)", "kind": "wrong_gmm", "delta": 0.3}],
    "solvers": ["ddim", "heun_vp"],
    "seeds": [0, 1],
    "network": {"width": 32, "depth": 2},
    "train": {"train_steps": 250, "batch_size": 64, "pool_size": 8192, "warmup_steps": 20},
    "eval": {"num_samples": 300, "max_points": 250, "score_error_samples": 256, "n_resamples": 200},
}


def quick_preset(cfg: ScoreErrorConfig) -> dict[str, Any]:
    """``QUICK``, and for a configured run with curves (``configs/score_error_curves.yaml``) curve steps that
    end at the quick budget (125 and 250: one doubling, so a convergence flag)."""
    if not cfg.curves.enabled:
        return QUICK
    steps = QUICK["train"]["train_steps"]
    return {**QUICK, "curves": {"steps": [steps // 2, steps]}}


# --- the run ---------------------------------------------------------------------------------------

def run(cfg: ScoreErrorConfig, out_dir=None, progress: bool = False, argv=None) -> dict[str, Any]:
    """Run the sweep and return the metrics dict. ``out_dir=None`` writes no files (the Python API);
    otherwise the folder (created if needed; refused if it already holds results, before anything is
    computed) gets ``config.json``, ``metrics.json``, ``table.md`` and the figures (PNG + PDF)."""
    from . import score_error_report as report

    out = common.open_output(out_dir, cfg, argv, study=STUDY)
    common.set_threads(cfg.threads)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    W = World(cfg, progress)

    # 1-2. per seed: evaluation data, teachers (score error, ODEs, chains, pools)
    with common.Timer() as tm:
        worlds = {(spec.label, seed): W.teacher(spec, seed)
                  for spec in tqdm(cfg.teachers, desc="teachers", disable=not progress, leave=False)
                  for seed in cfg.seeds}
    timings["teachers_and_pools"] = tm.seconds
    log(STUDY, f"{len(worlds)} (teacher, seed) worlds with ODEs, chains and pools: {tm.seconds:.0f} s")

    runs: list[dict[str, Any]] = []
    per_sample: dict[tuple, dict[str, np.ndarray]] = {}
    converged: dict[tuple, bool] = {}
    outputs: dict[tuple, Tensor] = {}
    curves: list[dict] = []
    methods = list(cfg.methods) + (["cd_ema"] if cfg.curves.enabled and "ema" in cfg.curves.targets else [])
    for init in cfg.inits:
        # 3. members: (teacher, solver, seed), teacher-major so that routes form contiguous blocks
        members = [(worlds[(spec.label, seed)], s, seed, init) for spec in cfg.teachers for s in cfg.solvers
                   for seed in cfg.seeds]
        routes = [Route(w.denoiser, s, w.pools[s], label=w.spec.label) for w, s, _, _ in members]
        init_seeds = [cfg.seeding.seed_for("init", seed) for _, _, seed, _ in members]
        batch_seeds = [cfg.seeding.seed_for("batch", seed) for _, _, seed, _ in members]
        xs = torch.stack([W.seed_data(seed).x_T for _, _, seed, _ in members]).float()
        init_state = None
        if init == "teacher":
            with common.Timer() as tm:
                st0 = make_ensemble_student(cfg.network, W.schedule, init_seeds, boundary=cfg.boundary, t_min=W.t_0)
                init_from_teacher(st0, routes, W.grid, W.sample_data, cfg.init_steps, cfg.train.batch_size,
                                  cfg.train.lr, progress="init" if progress else False, batch_seeds=batch_seeds)
                init_state = st0.state()
            timings[f"init_{init}"] = tm.seconds
        if cfg.curves.enabled:
            eval_steps = list(cfg.curves.steps)
        else:
            eval_steps = [cfg.train.train_steps // 2] if (cfg.eval.convergence_check and cfg.train.train_steps >= 2) else []
        curve_keys = list(cfg.curves.keys or ["E_solver"]) if cfg.curves.enabled else ["E_solver"]
        recorder = CurveRecorder(f"init={init}", {"init": init}, eval_steps, e_key="E_solver")
        for method in tqdm(methods, desc="methods", disable=not progress, leave=False):
            student = make_ensemble_student(cfg.network, W.schedule, init_seeds, boundary=cfg.boundary, t_min=W.t_0)
            if init_state is not None:
                student.load_state(init_state)
            update: dict[str, Any] = {"method": "cd" if method == "cd_ema" else method}
            if method == "cd_ema":
                update["ema_rate"] = cfg.curves.ema_rate
            hist = train_ensemble(cfg.train.model_copy(update=update), student, routes, W.grid, W.sample_data,
                                  progress=f"train {method} (E={len(members)})" if progress else False,
                                  batch_seeds=batch_seeds, eval_steps=eval_steps,
                                  on_eval=recorder.callback(method, curve_eval(curve_keys, members, W, xs)))
            timings[f"train_{method}_{init}"] = hist.seconds
            log(STUDY, f"trained {method} (init {init}, {len(members)} members): {hist.seconds:.0f} s")
            final_loss = hist.final_loss()
            with common.Timer() as tm:
                out_x = student.one_step(xs, W.t_T).double()  # (E, M, d)
                for m, (w, solver, seed, _) in enumerate(members):
                    row, terms = member_row(out_x[m], w, W.seed_data(seed), solver, W)
                    key = (w.spec.label, solver, init, method, seed)
                    runs.append({"teacher": w.spec.label, "family": w.spec.family, "score_error": w.score_error,
                                 "method": method, "solver": solver, "init": init, "seed": seed,
                                 "final_loss": final_loss[m], **row})
                    per_sample[key], outputs[key] = terms, out_x[m]
                    half = recorder.points.get(method, {}).get(eval_steps[0]) if eval_steps and not cfg.curves.enabled else None
                    if half is not None:
                        converged[key] = evidence.converged_flags([row["E_solver"]], [half["E_solver"][m]])[0]
            timings[f"eval_{method}_{init}"] = tm.seconds
            log(STUDY, f"evaluated {method} (init {init}): {tm.seconds:.0f} s")
        if cfg.curves.enabled:
            curves += report.split_curves(recorder, members, cfg, converged)

    # 4. reference rows (no student): each teacher's solver chains and exact ODE, the true ODE
    with common.Timer() as tm:
        references = report.reference_rows(cfg, worlds, W)
        floor, teacher_floors = report.floors(cfg, W, worlds)
    timings["references_and_floors"] = tm.seconds
    log(STUDY, f"references and floors: {tm.seconds:.0f} s")

    # 5. regimes (teacher, solver, init) with statistics, merged rows, corrected verdicts
    regimes = report.build_regimes(cfg, runs, per_sample, converged)
    kept, merged = evidence.merge_regimes(regimes, "solver", ("teacher", "init"))
    v = evidence.verdicts(kept, PRIMARY, e_key="E_solver", quick=cfg.quick)
    v_p0 = evidence.verdicts(kept, SECONDARY, e_key="E_solver", quick=cfg.quick)
    timings["total"] = time.perf_counter() - start
    teachers = {}
    for spec in cfg.teachers:
        ws = [worlds[(spec.label, s)] for s in cfg.seeds]
        opts = spec.options()
        if spec.kind == "learned":  # one training seed per run seed (the teacher source), unless held
            opts = {k: v for k, v in opts.items() if k != "seed"}
            opts["training_seeds"] = [int(w.denoiser.config.get("seed", spec.seed)) for w in ws]
        teachers[spec.label] = {"kind": spec.kind, **opts, "score_error": float(np.mean([w.score_error for w in ws])),
                                "score_error_values": [w.score_error for w in ws],
                                "pool_build_seconds": sum(p.build_seconds for w in ws for p in w.pools.values())}
    metrics = {
        "study": STUDY, "quick": cfg.quick,
        "budget": evidence.budget_block(cfg.train, cfg.init_steps if "teacher" in cfg.inits else 0, cfg.grid_size,
                                        inits=cfg.inits),
        "quality": {"key": PRIMARY, "label": "W2 to the teacher's exact-ODE samples", "higher_is_better": False},
        "quality_p0": {"key": SECONDARY, "label": "W2 to p_0"},
        "regimes": kept, "merged": merged, "verdicts": v, "verdicts_p0": v_p0,
        "floor": floor, "floor_teacher": teacher_floors,
        "teachers": teachers, "references": references, "runs": [{k: r[k] for k in r if not k.startswith("_")} for r in runs],
        "curves": curves, "seeding": cfg.seeding.model_dump(), "timings": timings,
        "timing": {"total_seconds": timings["total"]},
        "summary": evidence.summary_line(v, cfg.quick, "W2 to the teacher's samples"),
    }
    if out is not None:
        report.write(out, metrics, cfg, W, worlds, outputs)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parse_args(STUDY, argv, description=__doc__.split("\n")[0])
    cfg = common.resolve_config(ScoreErrorConfig, args, quick=quick_preset)
    cfg = common.apply_run_flags(cfg, args)
    out = common.results_folder(STUDY, args, quick=cfg.quick, create=not args.check)
    if common.report_check(args, f"studies.{STUDY}", cfg):
        return None
    metrics = run(cfg, out, progress=args.progress, argv=argv)
    print((out / "table.md").read_text())
    print(f"\nresults in {out} ({metrics['timings']['total']:.0f} s)")
    return metrics


if __name__ == "__main__":
    run_main(main)
