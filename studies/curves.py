"""Training-budget curves: every student evaluated along one run at log-spaced steps.

With ``curves.enabled`` a study trains each student once for ``max(curves.steps)`` optimizer steps at
a **constant** learning rate after warm-up (so the point at step s means the same as a run of s steps)
and evaluates it after each step in ``curves.steps`` (``toys.ensemble_train.train_ensemble``'s
``eval_steps`` / ``on_eval``). ``curves.targets`` adds CD with an EMA target (rate ``curves.ema_rate``;
method key ``cd_ema``) beside the stop-gradient target of the paper (``cd``); Direct CD has no target
network. The regimes then report the last point; the curve block holds every point.

Convergence flag at step s: ``|E(s) - E(s/2)| <= 5% E(s/2)`` (``studies.evidence.converged_flags``),
defined where s/2 is also a curve step (default steps double: 250, 500, ..., 8000).

Schema of ``metrics["curves"]`` (a list, one entry per trained cell)::

    {"label", "params", "steps": [s...],
     "methods": {m: {metric: {"mean": [per step], "std": [per step], "values": [[per seed] per step]}}},
     "converged": {m: [[bool per seed] or null per step]}}
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from odecm.config import StrictModel

from . import plotting
from .common import check_study_train, stat
from .evidence import CONVERGENCE_TOL, converged_flags

__all__ = ["CurveConfig", "CurveRecorder", "check_curve_budget", "check_curve_keys", "plot_curves", "half_index"]


class CurveConfig(StrictModel):
    """Evaluate every student along training (an option; off in the studies' defaults)."""

    enabled: bool = False
    steps: list[int] = Field(default_factory=lambda: [250, 500, 1000, 2000, 4000, 8000],
                             description="evaluation steps (log-spaced; doubling gives convergence flags)")
    targets: list[Literal["stop_gradient", "ema"]] = Field(default_factory=lambda: ["stop_gradient", "ema"])
    ema_rate: float = Field(0.99, gt=0, lt=1, description="EMA rate of the 'ema' target variant")
    keys: list[str] = Field(default_factory=list, description="metrics kept on the curves (default: the study's)")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v) or sorted(set(v)) != v:
            raise ValueError(f"must be strictly increasing positive integers, got {v}")
        return v


def check_curve_budget(curves: CurveConfig, train) -> None:
    """With curves on, the run's budget must be ``max(curves.steps)`` at a constant learning rate."""
    if not curves.enabled:
        return
    problems = []
    if train.train_steps != curves.steps[-1]:
        problems.append(f"train.train_steps={train.train_steps} must equal max(curves.steps)={curves.steps[-1]}")
    if train.lr_schedule != "constant":
        problems.append(f"train.lr_schedule={train.lr_schedule!r} must be 'constant' (a curve point = a run of that length)")
    if curves.steps[0] <= train.warmup_steps:
        problems.append(f"curves.steps[0]={curves.steps[0]} must exceed train.warmup_steps={train.warmup_steps}")
    if problems:
        raise ValueError("curves.enabled: " + "; ".join(problems))


def check_curve_keys(curves: CurveConfig, allowed: Sequence[str]) -> CurveConfig:
    """``curves.keys`` must be metrics the study evaluates along training (an unknown key would give an
    empty panel). For a pydantic field validator of a study's ``curves``."""
    unknown = [k for k in curves.keys if k not in allowed]
    if unknown:
        raise PydanticCustomError("curve_keys",
                                  f"keys {unknown} are not evaluated along training; allowed: {list(allowed)}")
    if len(set(curves.keys)) != len(curves.keys):
        raise PydanticCustomError("curve_keys", f"keys {curves.keys}: a key listed twice; allowed: distinct keys")
    return curves


def half_index(steps: Sequence[int], i: int) -> int | None:
    """Index of ``steps[i] / 2`` in ``steps`` (None when it is not a curve step)."""
    s = steps[i]
    return steps.index(s // 2) if s % 2 == 0 and s // 2 in steps else None


class CurveRecorder:
    """Collects ``record(step, method, {metric: [per member]})`` and turns them into the curve schema."""

    def __init__(self, label: str, params: Mapping[str, Any], steps: Sequence[int], e_key: str = "E"):
        self.label, self.params, self.steps, self.e_key = label, dict(params), list(steps), e_key
        self.points: dict[str, dict[int, dict[str, list[float]]]] = {}

    def record(self, step: int, method: str, metrics: Mapping[str, Sequence[float]]) -> None:
        self.points.setdefault(method, {})[int(step)] = {k: [float(x) for x in v] for k, v in metrics.items()}

    def callback(self, method: str, evaluate: Callable[[Any], Mapping[str, Sequence[float]]],
                 use_ema: bool = False) -> Callable:
        """An ``on_eval`` for ``train_ensemble``: ``evaluate(student)`` per curve step (the EMA view if asked)."""
        def on_eval(step, student, ema):
            self.record(step, method, evaluate(ema if (use_ema and ema is not None) else student))
        return on_eval

    def to_dict(self, members: slice | None = None, label: str | None = None,
                params: Mapping[str, Any] | None = None) -> dict:
        """The curve schema; ``members`` selects a block of members (e.g. one solver's seeds)."""
        sl = members or slice(None)
        methods, converged = {}, {}
        for m, full in self.points.items():
            by_step = {s: {k: v[sl] for k, v in vals.items()} for s, vals in full.items()}
            steps = [s for s in self.steps if s in by_step]
            keys = list(by_step[steps[0]]) if steps else []
            methods[m] = {}
            for k in keys:
                stats = [stat(by_step[s][k]) for s in steps]
                methods[m][k] = {"mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
                                 "values": [s["values"] for s in stats]}
            flags: list[Any] = []
            for i, s in enumerate(steps):
                j = half_index(steps, i)
                e = by_step[s].get(self.e_key)
                flags.append(converged_flags(e, by_step[steps[j]][self.e_key], CONVERGENCE_TOL)
                             if (j is not None and e is not None) else None)
            converged[m] = flags
        return {"label": label or self.label, "params": dict(params or self.params), "steps": self.steps,
                "methods": methods, "converged": converged}


def plot_curves(curves: Sequence[Mapping], path, keys: Sequence[str], quick: bool, title: str,
                floor: Mapping[str, Mapping] | None = None, max_rows: int = 6) -> list:
    """Rows: curve cells (at most ``max_rows``); columns: metrics. Mean ± std over seeds per method
    against training steps (log axes); hollow markers where not every seed had converged."""
    cells = list(curves)[:max_rows]
    if not cells:
        return []
    fig, axes = plotting.new_figure(len(cells), len(keys), size=(3.4, 2.6))
    for i, c in enumerate(cells):
        for j, key in enumerate(keys):
            ax = axes[i, j]
            drawn = False
            for m, vals in c["methods"].items():
                if key not in vals:
                    continue
                steps = c["steps"][:len(vals[key]["mean"])]
                mu, sd = np.asarray(vals[key]["mean"], float), np.asarray(vals[key]["std"], float)
                if not np.isfinite(mu).any():  # e.g. the mechanism of an exact teacher: not defined
                    continue
                drawn = True
                color = plotting.METHOD_COLORS.get(m, "k")
                ax.plot(steps, mu, color=color, lw=1.2, label=plotting.method_name(m))
                ax.fill_between(steps, mu - sd, mu + sd, color=color, alpha=0.15, lw=0)
                flags = c.get("converged", {}).get(m, [])
                done = [bool(f) and all(f) for f in flags] + [False] * (len(steps) - len(flags))
                ax.scatter(steps, mu, s=14, color=color, zorder=3,
                           facecolors=[color if d else "none" for d in done])
            if not drawn:
                ax.text(0.5, 0.5, "not defined here", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(plotting.short_label(key), fontsize=8)
                continue
            if floor and key in floor:
                plotting.floor_band(ax, floor[key])
            ax.set_xscale("log")
            if key.startswith("E") or key.startswith("w2") or key.startswith("mmd"):
                ax.set_yscale("log")
            plotting.tidy_log_axes(ax)
            ax.set_xlabel(plotting.label("train_steps"), fontsize=7)
            ax.set_ylabel(plotting.unit(key), fontsize=6)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(plotting.short_label(key), fontsize=8)
            if j == 0:
                ax.annotate(c["label"], xy=(-0.32, 0.5), xycoords="axes fraction", rotation=90, ha="center",
                            va="center", fontsize=7)
    axes[0, 0].scatter([], [], s=14, facecolors="none", edgecolors="k", label="not every seed converged")
    axes[0, 0].plot([], [], "o", ms=4, color="k", label="every seed converged")
    plotting.legend_outside(fig, axes)
    fig.suptitle(plotting.title(title + " (mean ± std over seeds)", quick), fontsize=9)
    return plotting.save(fig, path, rect=(0, 0.06, 1, 0.96))


class TrainedStudyConfig(StrictModel):
    """Base of a toy study's config with a ``train`` block and ``curves``: the train block keeps the
    study-set keys at their defaults (``common.check_study_train``) and the curve keys are the study's
    ``CURVE_KEYS`` (``check_curve_keys``)."""

    CURVE_KEYS: ClassVar[Sequence[str]] = ()

    @field_validator("train", check_fields=False)
    @classmethod
    def _train(cls, v: Any) -> Any:
        return check_study_train(v)

    @field_validator("curves", check_fields=False)
    @classmethod
    def _curve_keys(cls, v: CurveConfig) -> CurveConfig:
        return check_curve_keys(v, cls.CURVE_KEYS)
