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
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from odecm.cli import run_main
from odecm.config import SolverName, StrictModel
from odecm.grids import make_grid
from odecm.metrics import per_sample_sq_error
from odecm.solvers import get_solver, solve, solve_adaptive
from toys.ensemble import Route, TargetPool, TrainConfig, init_from_teacher, make_ensemble_student, train_ensemble
from toys.gmm import GaussianMixture, make_preset
from toys.metrics import covariance_spectrum, per_sample_quality, sample_quality
from toys.networks import NetworkConfig
from toys.scores import make_teacher, score_error

from . import common, evidence
from .cells import log, make_world_schedule
from .curves import CurveConfig, CurveRecorder, check_curve_budget
from .seeding import SeedConfig
from .stats import error_decomposition

Tensor = torch.Tensor
STUDY = "score_error"

#: sample-quality keys kept (vs p_0 and vs the teacher's distribution)
QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "mode_precision", "modes_covered", "nll",
                "variance_ratio")
TEACHER_QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "variance_ratio")
PRIMARY = "w2_teacher"
SECONDARY = "w2_p0"


class TeacherSpec(StrictModel):
    """One teacher of the sweep: ``make_teacher(kind, gmm, schedule, **options)``. ``seed`` fixes a
    ``wrong_gmm``'s perturbation (the teacher under study); a ``learned`` teacher's training seed is the
    run seed's ``teacher`` source (``seed`` when that source is held fixed)."""

    label: str
    kind: Literal["exact", "wrong_gmm", "nonconservative", "learned"]
    delta: float | None = Field(None, ge=0, description="wrong_gmm / nonconservative size")
    budget: int | None = Field(None, ge=0, description="learned: DSM training steps")
    seed: int = 0

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


class ScoreErrorConfig(StrictModel):
    renamed_keys = {"num_steps": "grid_size"}

    quick: bool = Field(False, description="a smoke run (set by --quick): never evidence")
    preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso"] = "ring8"
    schedule: Literal["sdxl", "vp", "vp_cosine", "edm"] = "sdxl"
    timestep_offset: Literal[0, 1] = Field(1, description="sdxl: 1 = the paper's indexing (grid ends at clean "
                                                          "data), 0 = diffusers' (ends at timestep 0)")
    grid: Literal["skip", "uniform", "karras"] = "skip"
    grid_size: int = Field(20, ge=1, description="N grid intervals (skip needs N | 1000)")
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

    @model_validator(mode="after")
    def _check(self):
        labels = [t.label for t in self.teachers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"teachers: labels must be unique, got {labels}")
        if not self.teachers or not self.methods or not self.solvers or not self.seeds or not self.inits:
            raise ValueError("teachers, methods, solvers, inits and seeds must be non-empty")
        if len(set(self.solvers)) != len(self.solvers):
            raise ValueError(f"solvers listed twice: {self.solvers}")
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


# --- the world -----------------------------------------------------------------------------------

@dataclass
class SeedData:
    """One run seed's evaluation data: noise ``x_T``, independent noise ``x_ref`` (for the teacher's
    samples), a p_0 reference and the TRUE ODE endpoint from ``x_T``."""

    x_T: Tensor
    x_ref: Tensor
    reference: Tensor
    true_ode: Tensor


@dataclass
class TeacherWorld:
    """A teacher in one run seed: its denoiser, score error and the quantities evaluated from that
    seed's noise: exact ODE endpoint, exact-ODE samples (its distribution), chains and pools per solver."""

    spec: TeacherSpec
    seed: int
    denoiser: Any
    score_error: float
    ode_end: Tensor
    ode_samples: Tensor
    chains: dict[str, Tensor]
    pools: dict[str, TargetPool]


def teacher_ode(den: Any, x_T: Tensor, t_from: float, t_to: float, ev: EvalSettings) -> Tensor:
    """The denoiser's PF-ODE endpoint (adaptive dopri5 in float64). Exact mixtures integrate to the
    clean point themselves; a network teacher is integrated to the schedule's ``t_min`` (its last
    trained noise level) and, if ``t_to`` is the clean point, finished with the exact first-order
    step there, ``x0_hat(x, t_min)`` (a DDIM step to sigma = 0)."""
    gmm = getattr(den, "gmm", None)
    if isinstance(gmm, GaussianMixture) and type(den).__name__ == "ExactGMMDenoiser":
        return gmm.exact_ode_solution(x_T.double(), t_from, t_to, den.schedule, rtol=ev.ode_rtol, atol=ev.ode_atol)
    sch = den.schedule
    clean = float(sch.sigma(torch.tensor(float(t_to), dtype=torch.float64))) <= 0
    t_end = max(float(t_to), float(sch.t_min)) if clean else float(t_to)
    with torch.no_grad():
        # float32 networks: looser tolerances than the float32 rounding of the vector field would allow
        x, _ = solve_adaptive(den, x_T.double(), t_from, t_end, rtol=max(ev.ode_rtol, 1e-5), atol=max(ev.ode_atol, 1e-6))
        if clean:
            x = get_solver("ddim").step(den, x, t_end, float(t_to))
    return x.double()


def quality(x: Tensor, ref: Tensor, gmm: GaussianMixture | None, ev: EvalSettings, suffix: str,
            keys: Sequence[str] = QUALITY_KEYS) -> dict[str, float]:
    q = sample_quality(x.double(), ref.double(), gmm=gmm, seed=ev.seed, max_points=ev.max_points, shrinkage=True)
    return {f"{k}_{suffix}": float(q[k]) for k in keys if k in q}


def errors(x: Tensor, solver_end: Tensor | None, teacher_end: Tensor, true_end: Tensor) -> dict[str, Tensor]:
    """Per-sample squared errors against the solver chain, the teacher's ODE and the true ODE."""
    out = {"E_teacher_ode": per_sample_sq_error(x, teacher_end), "E_true_ode": per_sample_sq_error(x, true_end)}
    if solver_end is not None:
        out["E_solver"] = per_sample_sq_error(x, solver_end)
    return out


class _World:
    """Builds (and caches by source seed) the evaluation data and teachers of every run seed."""

    def __init__(self, cfg: ScoreErrorConfig, progress: bool):
        self.cfg, self.ev, self.progress = cfg, cfg.eval, progress
        self.gmm = make_preset(cfg.preset)
        self.schedule = make_world_schedule(cfg.schedule, cfg.timestep_offset)
        self.grid = make_grid(cfg.grid, self.schedule, cfg.grid_size)
        self.t_T, self.t_0 = float(self.grid[-1]), float(self.grid[0])
        self.true_den = self.gmm.exact_denoiser(self.schedule)
        self._seed_data: dict[tuple, SeedData] = {}
        self._den: dict[tuple, tuple[Any, float]] = {}
        self._ode: dict[tuple, Tensor] = {}
        self._pools: dict[tuple, TargetPool] = {}

    def sample_data(self, n: int, g: torch.Generator) -> Tensor:
        return self.gmm.sample_p0(n, g)[0]

    def seed_data(self, seed: int) -> SeedData:
        src = self.cfg.seeding
        key = (src.seed_for("eval_noise", seed), src.seed_for("reference", seed))
        if key not in self._seed_data:
            ev = self.ev
            x_T = self.gmm.sample_pt(ev.num_samples, self.t_T, self.schedule, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(key[0]))[0]
            g_ref = torch.Generator().manual_seed(key[1])
            reference = self.gmm.sample_p0(ev.num_samples, g_ref, dtype=torch.float64)[0]
            x_ref = self.gmm.sample_pt(ev.num_samples, self.t_T, self.schedule, generator=g_ref, dtype=torch.float64)[0]
            self._seed_data[key] = SeedData(x_T, x_ref, reference, teacher_ode(self.true_den, x_T, self.t_T, self.t_0, ev))
        return self._seed_data[key]

    def teacher(self, spec: TeacherSpec, seed: int) -> TeacherWorld:
        src, ev = self.cfg.seeding, self.ev
        t_seed = src.seed_for("teacher", seed) if spec.kind == "learned" and "teacher" not in src.hold_fixed else None
        dkey = (spec.label, t_seed)
        if dkey not in self._den:
            den = make_teacher(spec.kind, self.gmm, self.schedule, **spec.options(t_seed))
            se = score_error(den, self.gmm, self.schedule, n=ev.score_error_samples,
                             generator=torch.Generator().manual_seed(ev.seed + 3)).mean
            self._den[dkey] = (den, float(se))
        den, se = self._den[dkey]
        sd = self.seed_data(seed)
        ekey = (dkey, src.seed_for("eval_noise", seed), src.seed_for("reference", seed))
        if ekey not in self._ode:
            self._ode[ekey] = teacher_ode(den, sd.x_T, self.t_T, self.t_0, ev)
            self._ode[ekey + ("samples",)] = teacher_ode(den, sd.x_ref, self.t_T, self.t_0, ev)
        with torch.no_grad():
            chains = {s: solve(s, den, sd.x_T.float(), self.grid, self.grid.numel() - 1).x.double()
                      for s in self.cfg.solvers}
        pools = {}
        for s in self.cfg.solvers:
            pkey = (dkey, s, src.seed_for("pool", seed))
            if pkey not in self._pools:
                self._pools[pkey] = TargetPool.build(den, s, self.grid, self.schedule, self.sample_data,
                                                     self.cfg.train.pool_size, pkey[2])
            pools[s] = self._pools[pkey]
        return TeacherWorld(spec, seed, den, se, self._ode[ekey], self._ode[ekey + ("samples",)], chains, pools)


# --- evaluation of one member ----------------------------------------------------------------------

def member_row(x: Tensor, w: TeacherWorld, sd: SeedData, solver: str, W: _World) -> tuple[dict, dict]:
    """Scalar metrics of one member (``x``: its one-step samples) and its per-sample terms."""
    ev = W.ev
    errs = errors(x, w.chains[solver], w.ode_end, sd.true_ode)
    row: dict[str, Any] = {k: float(v.mean()) for k, v in errs.items()}
    row.update(quality(x, sd.reference, W.gmm, ev, "p0"))
    terms = {k: errs[k].numpy() for k in ("E_solver", "E_true_ode")}
    ps = per_sample_quality(x, sd.reference, gmm=W.gmm)
    terms.update({"nll_p0": ps["nll"].numpy(), "mode_precision_p0": ps["mode_good"].numpy()})
    if ev.quality_vs_teacher:
        row.update(quality(x, w.ode_samples, None, ev, "teacher", TEACHER_QUALITY_KEYS))
        terms["precision_teacher"] = per_sample_quality(x, w.ode_samples)["precision"].numpy()
    if ev.mechanism and w.spec.kind != "exact":
        dec = error_decomposition(x, w.ode_end, sd.true_ode, n_resamples=ev.n_resamples, seed=ev.seed)
        row.update({"mech_correlation": dec.correlation.estimate, "mech_cosine": dec.mean_cosine.estimate,
                    "mech_correction": dec.correction.estimate})
        row["_mechanism"] = dec.to_dict()
    row["_spectrum"] = covariance_spectrum(x).tolist()
    row["_spectrum_teacher"] = covariance_spectrum(w.ode_samples).tolist()
    return row, terms


def curve_eval(keys: Sequence[str], members, W: _World, xs: Tensor) -> Any:
    """``evaluate(student)`` for the curves: ``keys`` per member at a curve step."""
    def evaluate(student):
        out = student.one_step(xs, W.t_T).double()
        vals: dict[str, list[float]] = {k: [] for k in keys}
        for m, (w, solver, _, _) in enumerate(members):
            x, sd = out[m], W.seed_data(w.seed)
            row = {k: float(v.mean()) for k, v in errors(x, w.chains[solver], w.ode_end, sd.true_ode).items()}
            if any(k.endswith("_p0") for k in keys):
                row.update(quality(x, sd.reference, W.gmm, W.ev, "p0", ("w2", "mmd2")))
            if any(k.endswith("_teacher") for k in keys):
                row.update(quality(x, w.ode_samples, None, W.ev, "teacher", ("w2", "mmd2")))
            if "mech_correlation" in keys:
                row["mech_correlation"] = (error_decomposition(x, w.ode_end, sd.true_ode, n_resamples=100).correlation
                                           .estimate if w.spec.kind != "exact" else float("nan"))
            for k in keys:
                vals[k].append(row.get(k, float("nan")))
        return vals
    return evaluate


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
    W = _World(cfg, progress)

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
    cfg = common.resolve_config(ScoreErrorConfig, args, quick=QUICK)
    if args.threads:
        cfg = cfg.model_copy(update={"threads": args.threads})
    out = common.results_folder(STUDY, args, quick=cfg.quick)
    metrics = run(cfg, out, progress=args.progress, argv=argv)
    print((out / "table.md").read_text())
    print(f"\nresults in {out} ({metrics['timings']['total']:.0f} s)")
    return metrics


if __name__ == "__main__":
    run_main(main)
