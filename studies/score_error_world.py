"""studies.score_error, the world: per-seed evaluation data, teachers and the evaluation of one student.

* ``SeedData``: one run seed's evaluation noise ``x_T``, independent noise for the teacher's samples, a
  p_0 reference and the TRUE ODE endpoint from ``x_T``;
* ``TeacherWorld``: a teacher in one run seed (its denoiser, score error, exact ODE endpoint and samples,
  solver chains and Direct CD pools); ``World`` builds both and caches them by source seed, so held
  sources (``studies.seeding``) are computed once;
* ``member_row``: the metrics and per-sample terms of one student; ``curve_eval``: the few metrics kept
  along training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from odecm.grids import make_grid
from odecm.metrics import per_sample_sq_error
from odecm.solvers import get_solver, solve, solve_adaptive
from toys.ensemble import TargetPool
from toys.gmm import ExactGMMDenoiser, GaussianMixture, make_preset
from toys.metrics import covariance_spectrum, per_sample_quality, sample_quality
from toys.scores import make_teacher, score_error

from .cells import make_world_schedule
from .stats import error_decomposition

Tensor = torch.Tensor

__all__ = ["QUALITY_KEYS", "TEACHER_QUALITY_KEYS", "PRIMARY", "SECONDARY", "SeedData", "TeacherWorld", "World",
           "teacher_ode", "quality", "errors", "member_row", "curve_eval"]

#: sample-quality keys kept (vs p_0 and vs the teacher's distribution)
QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "mode_precision", "modes_covered", "nll",
                "variance_ratio")
TEACHER_QUALITY_KEYS = ("w2", "sliced_w2", "mmd2", "precision", "recall", "variance_ratio")
PRIMARY = "w2_teacher"
SECONDARY = "w2_p0"


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

    spec: Any  # studies.score_error.TeacherSpec
    seed: int
    denoiser: Any
    score_error: float
    ode_end: Tensor
    ode_samples: Tensor
    chains: dict[str, Tensor]
    pools: dict[str, TargetPool]


def teacher_ode(den: Any, x_T: Tensor, t_from: float, t_to: float, ev) -> Tensor:
    """The denoiser's PF-ODE endpoint (adaptive dopri5 in float64). Exact mixtures integrate to the
    clean point themselves; a network teacher is integrated to the schedule's ``t_min`` (its last
    trained noise level) and, if ``t_to`` is the clean point, finished with the exact first-order
    step there, ``x0_hat(x, t_min)`` (a DDIM step to sigma = 0)."""
    gmm = getattr(den, "gmm", None)
    if isinstance(gmm, GaussianMixture) and isinstance(den, ExactGMMDenoiser):
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


def quality(x: Tensor, ref: Tensor, gmm: GaussianMixture | None, ev, suffix: str,
            keys: Sequence[str] = QUALITY_KEYS) -> dict[str, float]:
    q = sample_quality(x.double(), ref.double(), gmm=gmm, seed=ev.seed, max_points=ev.max_points, shrinkage=True)
    return {f"{k}_{suffix}": float(q[k]) for k in keys if k in q}


def errors(x: Tensor, solver_end: Tensor | None, teacher_end: Tensor, true_end: Tensor) -> dict[str, Tensor]:
    """Per-sample squared errors against the solver chain, the teacher's ODE and the true ODE."""
    out = {"E_teacher_ode": per_sample_sq_error(x, teacher_end), "E_true_ode": per_sample_sq_error(x, true_end)}
    if solver_end is not None:
        out["E_solver"] = per_sample_sq_error(x, solver_end)
    return out


class World:
    """Builds (and caches by source seed) the evaluation data and teachers of every run seed of a
    ``studies.score_error.ScoreErrorConfig``."""

    def __init__(self, cfg, progress: bool = False):
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

    def teacher(self, spec, seed: int) -> TeacherWorld:
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

def member_row(x: Tensor, w: TeacherWorld, sd: SeedData, solver: str, W: World) -> tuple[dict, dict]:
    """Scalar metrics of one member (``x``: its one-step samples) and its per-sample terms."""
    ev = W.ev
    errs = errors(x, w.chains[solver], w.ode_end, sd.true_ode)
    row: dict[str, Any] = {k: float(v.mean()) for k, v in errs.items()}
    row.update(quality(x, sd.reference, W.gmm, ev, "p0"))
    terms = {k: errs[k].numpy() for k in ("E_solver", "E_true_ode")}
    ps = per_sample_quality(x, gmm=W.gmm)  # nll and mode terms only: no k-NN against the reference
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


def curve_eval(keys: Sequence[str], members, W: World, xs: Tensor) -> Any:
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
