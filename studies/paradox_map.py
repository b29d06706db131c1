"""Phase diagram of the paradox: where does Direct CD solve the teacher's ODE better yet sample worse?

``python -m studies.paradox_map [--quick] [--config FILE] [--set key=value ...] [--out DIR]``
``metrics = studies.paradox_map.run(cfg)`` (Python; ``out_dir=None`` writes nothing)

One run = one 2D map: ``rows`` x ``cols``, each an axis of
``score_error`` (the teacher's knob within one family: ``wrong_gmm`` / ``nonconservative`` delta,
``learned`` DSM budget), ``width`` / ``depth`` (student capacity), ``train_steps`` (training budget,
evaluated along one run), ``dim`` (data dimension), ``n_modes`` (modes of the ``random`` preset) and
``k`` (the k-step target: 1 = CD, ``all`` = N = Direct CD) and ``direct_first`` (CD as a fine-tuner: P steps
of Direct CD, then CD up to ``train.train_steps``; 0 = plain CD). The default map is score error x student
width; ``studies/configs/paradox_map_*.yaml`` ship the others.

Per cell, over seeds (``studies.seeding``: every source not under study varies with the seed), the two
students of the comparison are paired by seed:

* ``cd``: CD (eq. 4, the online student under stop-gradient: the k = 1 target);
* ``direct_cd``: Direct CD (eq. 5, k = all) or, with ``k`` set (an axis or ``cfg.k``), the ``cd_k``
  student, whose target takes ``min(k, n)`` teacher steps then the target network. Its k = 1 cells are
  the CD students themselves (reference cells, difference 0 by construction, not counted) and k >= N
  is trained as Direct CD (the trainer's guarantee: the same loss on the same batch).

On a ``direct_first`` axis the first student of each cell (``cd`` in the JSON) is the two-phase one: P
steps of Direct CD, then CD with the same optimizer and learning rate (``TrainConfig.direct_first_steps``),
``train.train_steps`` steps in all; it is compared with Direct CD trained for the same total budget. Its
P = 0 cells are the ordinary CD vs Direct CD cells.

Each cell reports ``E_solver`` (eq. 6 against the teacher's solver chain from the member's evaluation
noise), ``w2_teacher`` (W2 of the one-step samples to the teacher's exact-ODE samples from independent
noise: the paper's FID-vs-teacher) and ``w2_p0`` (W2 to a sample of p_0, the second question), with
paired differences ``dE = E_cd - E_direct`` and ``dQ = W2_direct - W2_cd`` (> 0: CD closer). A cell is a
**paradox** (hatched) when both intervals exclude 0 on the positive side after correcting across every
counted cell of the map (``studies.stats.classify_regimes``, Holm by default); the p_0 question is
corrected separately (``verdicts_p0``).

Speed: one batched ensemble per (shape, method) with members = route cells x seeds (teacher knobs
and mode counts are routes; width / depth / dim need separate ensembles), Direct CD pools shared per
(teacher, solver, pool seed), budgets read along one constant-lr run, 1 torch thread.
Outputs: ``config.json``, ``metrics.json`` (the ``studies.evidence`` regime schema plus a ``map``
block), ``table.md`` and ``paradox_map.png`` / ``.pdf`` (three heatmaps).
"""
from __future__ import annotations

import os
import time
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from odecm.cli import run_main
from odecm.config import StrictModel
from toys.ensemble import TrainConfig
from toys.networks import NetworkConfig

from . import common
from .cells import DataConfig, WorldConfig, log
from .seeding import SeedConfig

STUDY = "paradox_map"

#: axis name -> how it is realised: ``route`` (members of one ensemble), ``shape`` (separate ensembles),
#: ``target`` (separate trainings with another k or another two-phase schedule), ``budget`` (evaluation
#: steps along one run)
AXES = {"score_error": "route", "n_modes": "route", "width": "shape", "depth": "shape", "dim": "shape",
        "k": "target", "direct_first": "target", "train_steps": "budget"}
AxisName = Literal["score_error", "n_modes", "width", "depth", "dim", "k", "direct_first", "train_steps"]
#: teacher families with a continuous (or integer) knob, and what the knob is
KNOBS = {"wrong_gmm": "delta", "nonconservative": "delta", "learned": "budget"}


class AxisConfig(StrictModel):
    """One axis of the map: ``name`` and its ``values`` (ints for width / depth / dim / n_modes /
    train_steps, >= 0 numbers for score_error, ints >= 1 or ``"all"`` for k, ints >= 0 for direct_first:
    Direct CD steps before CD takes over, each < ``train.train_steps``, checked by the map)."""

    name: AxisName
    values: list[int | float | str]

    @model_validator(mode="after")
    def _check_values(self):
        v, name = self.values, self.name
        if not v:
            raise ValueError(f"{name}: values must be non-empty")
        if any(isinstance(x, bool) for x in v):
            raise ValueError(f"{name}: values must be numbers, got a boolean in {v}")
        if len(set(map(str, v))) != len(v):
            raise ValueError(f"{name}: values listed twice in {v}")
        if name == "k":
            bad = [x for x in v if not (x == "all" or (isinstance(x, int) and x >= 1))]
            if bad:
                raise ValueError(f"k: bad values {bad}; allowed: integers >= 1 or 'all'")
        elif name == "direct_first":
            bad = [x for x in v if not isinstance(x, int) or x < 0]
            if bad:
                raise ValueError(f"direct_first: bad values {bad}; allowed: integers >= 0 (Direct CD steps before CD, "
                                 f"0 = plain CD), each < train.train_steps")
        elif name == "score_error":
            bad = [x for x in v if isinstance(x, str) or x < 0]
            if bad:
                raise ValueError(f"score_error: bad values {bad}; allowed: numbers >= 0 (the family's knob)")
        else:
            low = 2 if name == "dim" else 1
            bad = [x for x in v if not isinstance(x, int) or x < low]
            if bad:
                raise ValueError(f"{name}: bad values {bad}; allowed: integers >= {low}")
        return self


class TeacherFamily(StrictModel):
    """The teacher family (``toys.scores.make_teacher``) and its knob where ``score_error`` is not an axis."""

    kind: Literal["exact", "wrong_gmm", "nonconservative", "learned"] = "wrong_gmm"
    knob: float = Field(0.0, ge=0, description="delta (wrong_gmm, nonconservative) or DSM budget (learned)")
    seed: int = Field(0, description="wrong_gmm: the perturbation directions (the teacher under study, held "
                                     "fixed); a learned teacher's training seed is the run seed's 'teacher' source")
    width: int = Field(64, ge=1, description="learned teacher width")
    depth: int = Field(3, ge=1, description="learned teacher depth")

    @model_validator(mode="after")
    def _knob_of_its_kind(self):
        if self.kind == "exact" and self.knob != 0:
            raise ValueError(f"knob={self.knob}: the exact teacher has no knob; allowed with kind 'exact': 0")
        return self


class MapEval(StrictModel):
    num_samples: int = Field(1000, ge=10, description="evaluation noise / reference / teacher sample size")
    max_points: int = Field(800, ge=10, description="subsample for exact W2 (POT)")
    seed: int = Field(777, description="seed of the W2 subsampling and the floor draws")
    floor: bool = Field(True, description="finite-sample W2 floors per world (two independent samples)")
    floor_draws: int = Field(10, ge=10, description="draws per floor (a distribution)")
    convergence_check: bool = Field(True, description="also evaluate E at half of every budget (convergence flag)")
    score_error_samples: int = Field(1024, ge=16, description="points per timestep for toys.scores.score_error")
    ode_rtol: float = Field(1e-6, gt=0, description="teacher ODE (teachers without an exact mixture)")
    ode_atol: float = Field(1e-8, gt=0)


class MapStats(StrictModel):
    correction: Literal["holm", "bh", "bonferroni", "none"] = "holm"
    alpha: float = Field(0.05, gt=0, lt=1)


class ParadoxMapConfig(StrictModel):
    """One map (see the module docstring). ``k`` is the comparison's k where k is not an axis."""

    quick: bool = Field(False, description="a smoke run (set by --quick): never evidence")
    title: str = "teacher score error x student capacity"
    rows: AxisConfig = AxisConfig(name="width", values=[8, 16, 32, 64, 128])
    cols: AxisConfig = AxisConfig(name="score_error", values=[0.0, 0.1, 0.2, 0.3, 0.5])
    teacher: TeacherFamily = TeacherFamily()
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=2)
    train: TrainConfig = TrainConfig(train_steps=2000, batch_size=128, lr=1e-3, lr_schedule="constant",
                                     warmup_steps=100, pool_size=32768, log_every=100)
    k: int | Literal["all"] = Field("all", description="the comparison's k where k is not an axis (all = Direct CD)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    seeding: SeedConfig = SeedConfig()
    eval: MapEval = MapEval()
    stats: MapStats = MapStats()
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    progress: bool = False
    plots: bool = True

    @field_validator("k")
    @classmethod
    def _k(cls, v):
        if isinstance(v, int) and (isinstance(v, bool) or v < 1):
            raise ValueError("allowed: an integer >= 1 or 'all'")
        return v

    @model_validator(mode="after")
    def _check(self):
        r, c = self.rows.name, self.cols.name
        if r == c:
            raise ValueError(f"rows and cols are both {r!r}; a map needs two different axes")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be non-empty and distinct, got {self.seeds}")
        names = {r, c}
        if "score_error" in names and self.teacher.kind not in KNOBS:
            raise ValueError(f"axis score_error needs a teacher family with a knob ({sorted(KNOBS)}); "
                             f"teacher.kind={self.teacher.kind!r}")
        if self.teacher.kind == "learned":
            vals = self.axis_values("score_error") if "score_error" in names else [self.teacher.knob]
            if any(float(v) != int(v) for v in vals):
                raise ValueError(f"learned teacher: the knob is an integer DSM budget, got {vals}")
        if "n_modes" in names and self.data.preset != "random":
            raise ValueError(f"axis n_modes needs data.preset='random', got {self.data.preset!r}")
        if "n_modes" in names and self.train.data != "pool":
            raise ValueError("axis n_modes puts different data in one ensemble: train.data must be 'pool'")
        t = self.train
        if t.method != "cd" or t.k is not None or t.direct_first_steps:
            raise ValueError("train.method / train.k / train.direct_first_steps are set by the map (CD vs Direct CD "
                             "or cd_k; the two-phase schedule is the axis 'direct_first'); leave them at their "
                             "defaults (method 'cd', k null, direct_first_steps 0)")
        if "direct_first" in names:
            self._check_direct_first(names)
        if "train_steps" in names:
            if t.lr_schedule != "constant":
                raise ValueError(f"axis train_steps reads budgets along one run: train.lr_schedule must be 'constant', "
                                 f"got {t.lr_schedule!r}")
            if min(self.axis_values("train_steps")) <= t.warmup_steps:
                raise ValueError(f"axis train_steps: every budget must exceed train.warmup_steps={t.warmup_steps}")
        return self

    def _check_direct_first(self, names: set[str]) -> None:
        """A ``direct_first`` map compares the two-phase student with Direct CD of the same total budget."""
        T = self.train.train_steps
        bad = [p for p in self.axis_values("direct_first") if p >= T]
        if bad:
            raise ValueError(f"direct_first: bad values {bad}; allowed: integers 0 <= P < train.train_steps={T} "
                             f"(P Direct CD steps, then CD for the remaining train_steps - P)")
        if "k" in names or self.k != "all":
            raise ValueError(f"direct_first: the two-phase student is compared with Direct CD; allowed with it: "
                             f"k='all' and no k axis (got k={self.k!r}, axes {sorted(names)})")
        if "train_steps" in names:
            raise ValueError("direct_first: the total budget is train.train_steps; allowed axes beside it: "
                             f"{sorted(a for a in AXES if a not in ('direct_first', 'train_steps', 'k'))}")

    def axis_values(self, name: str) -> list:
        for ax in (self.rows, self.cols):
            if ax.name == name:
                return list(ax.values)
        raise KeyError(name)


def quick_overrides(cfg: ParadoxMapConfig) -> dict[str, Any]:
    """``--quick``: the smoke version of the configured map (never evidence): the first and last value of
    each axis (budgets 40 and 80 on a ``train_steps`` axis; on a ``k`` axis the first k > 1, so a k-step
    student is trained; on a ``direct_first`` axis the first and last P rescaled to the 80-step budget,
    ``round(80 P / train.train_steps)``, clipped to 1..79 for P > 0), two seeds, 80 steps of batch 32,
    small pools and evaluation sets. Applied after ``--config`` and before ``--set``, so every shipped map
    has a smoke version."""
    steps = 80

    def axis(ax: AxisConfig) -> dict:
        vals = list(ax.values)
        if ax.name == "k" and len(vals) > 2:
            vals = [v for v in vals if v != 1]
        vals = list(dict.fromkeys([vals[0], vals[-1]]))
        if ax.name == "train_steps":
            vals = [40, 80]
        elif ax.name == "direct_first":
            vals = list(dict.fromkeys(p and min(max(1, round(steps * p / cfg.train.train_steps)), steps - 1)
                                      for p in vals))
        return {"name": ax.name, "values": vals}

    return {"quick": True, "rows": axis(cfg.rows), "cols": axis(cfg.cols), "seeds": list(cfg.seeds[:2]),
            "train": {"train_steps": steps, "batch_size": 32, "pool_size": 2048, "warmup_steps": 10, "log_every": 20},
            "eval": {"num_samples": 200, "max_points": 200, "score_error_samples": 64}}


def resolve(args) -> ParadoxMapConfig:
    """``studies.common.resolve_config`` with ``quick_overrides``: the study's defaults -> ``--config`` file ->
    the smoke version of the configured map (with ``--quick``) -> ``--set``."""
    return common.resolve_config(ParadoxMapConfig, args, quick=quick_overrides)


def run(cfg: ParadoxMapConfig, out_dir=None, progress: bool | None = None, argv: Sequence[str] | None = None) -> dict:
    """Train and evaluate every cell of the map; return the metrics dict. ``out_dir=None`` writes
    nothing; otherwise the folder (refused if it already holds results) gets ``config.json``,
    ``metrics.json``, ``table.md`` and the heatmaps (PNG + PDF)."""
    from . import paradox_map_engine as engine
    from . import paradox_map_report as report

    common.set_threads(cfg.threads)  # first, so config.json's provenance records the threads the run uses
    out = common.open_output(out_dir, cfg, argv, study=STUDY, quick=cfg.quick)
    progress = cfg.progress if progress is None else progress
    load_start = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    plan = engine.plan_map(cfg)
    log(STUDY, f"{len(plan.cells)} cells, {len(plan.trainings)} trainings, {len(cfg.seeds)} seeds")
    results = engine.run_trainings(cfg, plan, progress)
    floors = engine.world_floors(cfg, plan, results.worlds) if cfg.eval.floor else {}
    metrics = report.build_metrics(cfg, plan, results, floors)
    metrics["timing"] = {"total_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
                         **results.timing,
                         "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
                         "threads": cfg.threads}
    if out is not None:
        report.write(out, metrics, cfg.plots)
    log(STUDY, f"done in {metrics['timing']['total_seconds']:.0f} s: {metrics['summary']}")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    args = common.parse_args(STUDY, argv, description=__doc__.splitlines()[0])
    cfg = resolve(args)
    cfg = common.apply_run_flags(cfg, args)
    out = common.results_folder(STUDY, args, quick=cfg.quick, create=not args.check)
    if common.report_check(args, f"studies.{STUDY}", cfg):
        return None
    metrics = run(cfg, out_dir=out, argv=argv)
    print((out / "table.md").read_text())
    print(f"\n{STUDY}: results in {out} ({metrics['timing']['total_seconds']:.0f} s)")
    return metrics


if __name__ == "__main__":
    run_main(main)
