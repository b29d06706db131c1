"""The worlds of the exact-teacher toy studies (``studies.cells``): data, schedule, grid and solver configs,
``World`` (exact GMM teacher) and the per-seed evaluation sets; every name is re-exported by ``studies.cells``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from odecm.config import SolverName, StrictModel
from odecm.grids import make_grid
from odecm.schedules import DiscreteSchedule, NoiseSchedule, make_schedule
from odecm.solvers import solve
from toys.gmm import GaussianMixture, make_preset

Tensor = torch.Tensor

__all__ = [
    "DataConfig", "WorldConfig", "EvalConfig", "World", "build_world", "make_world_schedule", "grid_problem",
    "check_grid", "GridChecked", "EvalSet", "EvalCache", "make_eval_set",
]


class DataConfig(StrictModel):
    """The data mixture: ``toys.gmm.make_preset(preset, dim, embed, **options)``."""

    preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso", "random"] = "ring8"
    dim: int = Field(2, ge=2)
    embed: Literal["pad", "rotate"] = "pad"
    n_modes: int | None = Field(None, ge=1, description="modes of the 'random' preset (default 8)")
    seed: int = 0

    @field_validator("n_modes")
    @classmethod
    def _modes_of_random_only(cls, v: int | None, info: ValidationInfo) -> int | None:
        preset = info.data.get("preset")
        if v is not None and preset is not None and preset != "random":
            raise PydanticCustomError("random_only", f"applies to preset 'random' only (preset={preset!r}); "
                                                     "allowed here: null")
        return v

    def build(self) -> GaussianMixture:
        kw = {"n_modes": self.n_modes} if (self.preset == "random" and self.n_modes) else {}
        return make_preset(self.preset, self.dim, embed=self.embed, seed=self.seed, **kw)


def make_world_schedule(name: str, timestep_offset: int = 1) -> NoiseSchedule:
    """``make_schedule(name)``; the discrete ``sdxl`` schedule takes the indexing ``timestep_offset``."""
    return make_schedule(name, timestep_offset=timestep_offset) if name == "sdxl" else make_schedule(name)


def grid_problem(grid: str, schedule: str, grid_size: int | None = None, timestep_offset: int = 1) -> str | None:
    """Why ``grid`` (with ``grid_size`` = N intervals) cannot be built on ``schedule``, or None when it can.

    The skip grid ``t_n = n T/N - 1 + offset`` needs a discrete schedule and N | T (its T training timesteps;
    1000 for ``sdxl``); ``uniform`` and ``karras`` work on every schedule."""
    if grid != "skip":
        return None
    sch = make_world_schedule(schedule, timestep_offset)
    if not isinstance(sch, DiscreteSchedule):
        return (f"grid='skip' needs a discrete schedule (the LCM / paper grid of timesteps), got "
                f"schedule={schedule!r}; allowed: schedule 'sdxl', or grid 'uniform' / 'karras'")
    T = sch.num_train_timesteps
    if grid_size is not None and T % grid_size:
        examples = ", ".join(str(n) for n in (10, 20, 25, 50, 100) if T % n == 0)
        return (f"grid_size={grid_size} must divide {T} (the skip grid of schedule {schedule!r} steps T/N of its "
                f"T = {T} timesteps); allowed: a divisor of {T}" + (f" such as {examples}" if examples else ""))
    return None


def check_grid(grid: str, schedule: str | None, grid_size: int | None = None, timestep_offset: int | None = 1) -> None:
    """``grid_problem`` as a pydantic validation error (for field validators); None values (fields that
    failed their own checks) are skipped."""
    if schedule is None or timestep_offset is None:
        return
    problem = grid_problem(grid, schedule, grid_size, timestep_offset)
    if problem:
        raise PydanticCustomError("grid", problem)


class GridChecked(StrictModel):
    """Base of a config with ``schedule``, ``timestep_offset``, ``grid`` and ``grid_size`` fields: the grid
    must fit the schedule and N the grid (``check_grid``), checked field by field."""

    @field_validator("grid", check_fields=False)
    @classmethod
    def _grid_fits_schedule(cls, v: str, info: ValidationInfo) -> str:
        check_grid(v, info.data.get("schedule"), None, info.data.get("timestep_offset"))
        return v

    @field_validator("grid_size", check_fields=False)
    @classmethod
    def _grid_size_fits_grid(cls, v: int, info: ValidationInfo) -> int:
        if "grid" in info.data:
            check_grid(info.data["grid"], info.data.get("schedule"), v, info.data.get("timestep_offset"))
        return v


class WorldConfig(GridChecked):
    """Teacher solver and time grid (the teacher itself is the exact GMM denoiser). Defaults follow the
    paper: SDXL's discrete schedule with the paper's indexing (``timestep_offset=1``: timesteps 1..1000,
    the clean point at 0), the LCM skip grid with N = 20 (0, 50, ..., 1000), DDIM, LCM boundary scalings."""

    renamed_keys = {"num_steps": "grid_size"}

    schedule: Literal["vp", "vp_cosine", "ve", "edm", "sdxl"] = "sdxl"
    timestep_offset: Literal[0, 1] = Field(1, description="discrete schedules: 1 = the paper's indexing (grid ends "
                                                          "at clean data), 0 = diffusers' (ends at timestep 0)")
    grid: Literal["uniform", "karras", "skip"] = Field("skip", validate_default=True)
    solver: SolverName = "ddim"
    grid_size: int = Field(20, ge=1, validate_default=True,
                           description="N, the number of grid intervals (skip grid: N | 1000)")
    boundary: Literal["lcm", "edm"] = "lcm"


class EvalConfig(StrictModel):
    num_samples: int = Field(2000, ge=10, description="one-step samples per member (and reference size)")
    max_points: int = Field(1000, ge=10, description="subsample for the O(n^2) metrics (W2, MMD, k-NN)")
    exact_ode: bool = True
    floor_draws: int = Field(10, ge=10, description="draws of the finite-sample floor (a distribution)")
    n_resamples: int = Field(1000, ge=100, description="bootstrap resamples over evaluation samples")
    convergence_check: bool = Field(True, description="also evaluate E at half the budget (convergence flag)")
    seed: int = Field(777, description="seed of the floor draws and metric subsampling")


@dataclass
class World:
    gmm: GaussianMixture
    schedule: NoiseSchedule
    grid: Tensor
    solver: str
    boundary: str
    teacher: Any

    @property
    def t_max(self) -> float:
        return float(self.grid[-1])

    @property
    def t_0(self) -> float:
        return float(self.grid[0])

    def sample_data(self, n: int, g: torch.Generator) -> Tensor:
        return self.gmm.sample_p0(n, g)[0]


def build_world(data: DataConfig, world: WorldConfig, solver: str | None = None, grid_size: int | None = None) -> World:
    """The world of ``data`` and ``world`` (``solver`` / ``grid_size``, when given, replace the config's)."""
    gmm = data.build()
    schedule = make_world_schedule(world.schedule, world.timestep_offset)
    grid = make_grid(world.grid, schedule, world.grid_size if grid_size is None else grid_size)
    return World(gmm, schedule, grid, world.solver if solver is None else solver, world.boundary,
                 gmm.exact_denoiser(schedule))


@dataclass
class EvalSet:
    """One seed's evaluation data in one world: noise ``x_T``, the teacher solver's and the exact ODE's
    endpoints from it, and a reference sample of ``p_0``."""

    x_T: Tensor
    solver_end: Tensor
    exact_end: Tensor | None
    reference: Tensor
    eval_seed: int
    reference_seed: int


@dataclass
class EvalCache:
    """Exact ODE endpoints keyed by (data, eval seed, t_T, t_0): the same noise is solved once."""

    exact: dict[tuple, Tensor] = field(default_factory=dict)


def make_eval_set(world: World, cfg: EvalConfig, eval_seed: int, reference_seed: int,
                  cache: EvalCache | None = None) -> EvalSet:
    """``x_T ~ p_T`` from ``Generator(eval_seed)``, the reference ``~ p_0`` from ``Generator(reference_seed)``."""
    x_T = world.gmm.sample_pt(cfg.num_samples, world.t_max, world.schedule,
                              generator=torch.Generator().manual_seed(int(eval_seed)), dtype=torch.float64)[0]
    with torch.no_grad():
        solver_end = solve(world.solver, world.teacher, x_T, world.grid, world.grid.numel() - 1).x
    exact = None
    if cfg.exact_ode:
        key = (id(world.gmm), int(eval_seed), world.t_max, world.t_0, cfg.num_samples)
        if cache is None or key not in cache.exact:
            exact = world.gmm.exact_ode_solution(x_T, world.t_max, world.t_0, world.schedule, rtol=1e-7, atol=1e-9)
            if cache is not None:
                cache.exact[key] = exact
        exact = cache.exact[key] if cache is not None else exact
    reference = world.gmm.sample_p0(cfg.num_samples, torch.Generator().manual_seed(int(reference_seed)),
                                    dtype=torch.float64)[0]
    return EvalSet(x_T, solver_end, exact, reference, int(eval_seed), int(reference_seed))
