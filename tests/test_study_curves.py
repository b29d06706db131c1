"""Training-budget curves (``curves.enabled``) of latent_space, inductive_bias and solver_ablation: a tiny
in-process run of each gives every student's E at each curve step, the regimes report the last point and
carry the convergence flag read from the curve (E within 5% of its value at half the budget)."""
from __future__ import annotations

import importlib
import math

import pytest

from studies import common
from studies.evidence import CONVERGENCE_TOL

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = [10, 20]
#: curves on (2 steps, constant lr, both targets) on top of each study's --quick preset
CURVES = ["curves.enabled=true", f"curves.steps={STEPS}", "curves.targets=[stop_gradient, ema]",
          "train.train_steps=20", "train.lr_schedule=constant", "train.warmup_steps=2", "train.batch_size=32",
          "train.pool_size=512", "network.width=8", "network.depth=1", "seeds=[0, 1]", "eval.num_samples=96",
          "eval.max_points=96", "eval.n_resamples=100"]
#: each study's smallest settings (one trained cell)
SMALLEST = {
    "latent_space": ["budgets=[20]", "decoders=[{kind: identity}]"],
    "inductive_bias": ["sweeps=[capacity]", "capacity=[[8, 1]]"],
    "solver_ablation": ["grid_sizes=[4]", "solvers=[ddim]"],
}
METHODS = {"cd", "direct_cd", "cd_ema"}
MODELS = {"latent_space": "LatentSpaceConfig", "inductive_bias": "InductiveBiasConfig",
          "solver_ablation": "SolverAblationConfig"}


def _curve_run(name: str) -> dict:
    mod = importlib.import_module(f"studies.{name}")
    sets = [a for s in CURVES + SMALLEST[name] for a in ("--set", s)]
    cfg = common.resolve_config(getattr(mod, MODELS[name]), common.parse_args(name, ["--quick", *sets]), mod.QUICK)
    assert cfg.curves.enabled and cfg.train.train_steps == STEPS[-1] and cfg.quick
    return mod.run(cfg.model_copy(update={"progress": False}), out_dir=None)


@pytest.mark.parametrize("name", list(SMALLEST))
def test_curves_hold_every_step_finite_e_and_a_convergence_flag(name):
    m = _curve_run(name)
    curves = m["curves"]
    assert len(curves) == 1, [c["label"] for c in curves]  # one trained cell
    c = curves[0]
    assert c["steps"] == STEPS and set(c["methods"]) == METHODS and set(c["converged"]) == METHODS
    for method, vals in c["methods"].items():
        e = vals["E"]
        assert len(e["mean"]) == len(STEPS) and len(e["values"]) == len(STEPS), method
        assert all(len(per_step) == 2 and all(math.isfinite(x) and x > 0 for x in per_step) for per_step in e["values"])
        assert all(math.isfinite(x) for x in vals["E_exact"]["mean"]), method
        # the flag: none at the first step (its half is no curve step), per seed at the last (half = 10)
        flags = c["converged"][method]
        assert flags[0] is None and len(flags[1]) == 2 and all(isinstance(f, bool) for f in flags[1])
        want = [abs(a - b) <= CONVERGENCE_TOL * b for a, b in zip(e["values"][1], e["values"][0])]
        assert flags[1] == want, (method, e["values"])
    # the regimes report the curve's last point and its flags
    regs = [r for r in m["regimes"] if r["methods"].get("cd")]
    hits = [r for r in regs if r["methods"]["cd"]["E"]["values"] == c["methods"]["cd"]["E"]["values"][-1]]
    assert hits, "no regime reports the curve's last point"
    assert hits[0]["converged"]["cd"] == c["converged"]["cd"][-1]
    assert hits[0]["methods"]["direct_cd"]["E"]["values"] == c["methods"]["direct_cd"]["E"]["values"][-1]
