"""Inductive bias: with the exact teacher and no decoder, only the objective differs between CD and
Direct CD. Does CD still give better samples although Direct CD has the lower ODE error E?

``python -m studies.inductive_bias [--quick] [--config FILE] [--set key=value ...] [--out DIR]``
``metrics = studies.inductive_bias.run(cfg)`` (Python; ``out_dir=None`` writes nothing)

Sweeps (each one factor away from the base point ``network.width/depth``, ``train.train_steps``,
``train.ema_rate``, all with the exact GMM teacher and the identity decoder):

* ``capacity`` — student (width, depth) pairs;
* ``budget`` — training steps (each a full run; with ``curves.enabled`` every student is also
  evaluated along training, which makes this sweep a by-product);
* ``target`` — CD's target policy: EMA rates mu (0 = the online student under stop-gradient, the
  paper's choice); Direct CD has no target network, so its base run is the reference;
* ``dimension`` — "where does the paradox appear?": the ``random`` preset with ``dim_modes`` modes in
  d = ``dims`` at the base capacity and budget.

Per regime and method, over seeds (each seed varies initialisation, batches, pool, evaluation noise
and reference; ``studies.seeding``): E (eq. 6, against the teacher solver), E_exact (against the exact
ODE), sample quality of the one-step samples against p_0 (= the exact teacher's samples), shrinkage,
convergence flags, paired differences and the corrected verdicts (``studies.stats``).
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from odecm.cli import run_main
from toys.ensemble import Route, TrainConfig
from toys.networks import NetworkConfig

from . import cells, common, evidence, plotting
from .cells import DataConfig, EvalConfig, WorldConfig
from .curves import CurveConfig, TrainedStudyConfig, check_curve_budget, plot_curves
from .seeding import SeedConfig

STUDY = "inductive_bias"
Sweep = Literal["capacity", "budget", "target", "dimension"]
TABLE_KEYS = ("E", "E_exact", "w2", "mmd2", "modes_covered", "variance_ratio", "final_loss")
#: the list each sweep runs over
SWEPT_LISTS = {"capacity": "capacity", "budget": "budgets", "target": "ema_rates", "dimension": "dims"}


class InductiveBiasConfig(TrainedStudyConfig):
    CURVE_KEYS = cells.CURVE_KEYS
    quick: bool = Field(False, description="a smoke run (set by --quick): never evidence")
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, pool_size=2**16, log_every=100, lr=2e-3,
                                     lr_schedule="cosine")
    eval: EvalConfig = EvalConfig()
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    seeding: SeedConfig = SeedConfig()
    sweeps: list[Sweep] = Field(default_factory=lambda: ["capacity", "budget", "target", "dimension"])
    capacity: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] = Field(
        default_factory=lambda: [(16, 3), (64, 3), (256, 3), (64, 1), (64, 5)],
        description="(width, depth) pairs, each >= 1")
    budgets: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [500, 1500, 5000],
                                                       description="training steps, each >= 1")
    ema_rates: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.9, 0.99, 0.999], description="CD target EMA rates mu in [0, 1) (0 = stop-grad)")
    dims: list[Annotated[int, Field(ge=2)]] = Field(default_factory=lambda: [2, 16, 64],
                                                    description="data dimensions, each >= 2")
    dim_preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso", "random"] = "random"
    dim_modes: int = Field(32, ge=1, description="modes of the 'random' preset in the dimension sweep")
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    curves: CurveConfig = CurveConfig()
    threads: int | None = Field(1, ge=1, description="torch threads (small MLPs: 1 is fastest on shared cores)")
    progress: bool = False

    @field_validator("seeds", "sweeps")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return common.distinct(v)

    @field_validator("capacity", "budgets", "ema_rates", "dims")
    @classmethod
    def _no_value_twice(cls, v: list) -> list:
        return common.distinct(v) if v else v  # non-empty when swept: checked below

    @model_validator(mode="after")
    def _check(self):
        for sweep, key in SWEPT_LISTS.items():
            if sweep in self.sweeps and not getattr(self, key):
                raise PydanticCustomError("empty_list", f"{key} must be non-empty: sweeps includes {sweep!r}")
        if self.curves.enabled and "budget" in self.sweeps:
            raise PydanticCustomError("curves_budget", "sweeps: 'budget' with curves.enabled: the curves already hold "
                                      "every budget up to train.train_steps; allowed: drop 'budget' from sweeps, or "
                                      "curves.enabled=false")
        check_curve_budget(self.curves, self.train)
        return self


QUICK: dict[str, Any] = {
    "quick": True,
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256, "n_resamples": 200},
    "world": {"grid_size": 10},
    "capacity": [[8, 2], [16, 2]],
    "budgets": [20, 40],
    "ema_rates": [0.0, 0.9],
    "dims": [2, 4],
    "dim_modes": 4,
}


class _Runner:
    """Trains each (world, network, train, methods) cell once and caches its ``CellResult``."""

    def __init__(self, cfg: InductiveBiasConfig, progress: bool):
        self.cfg, self.progress = cfg, progress
        self.worlds: dict[str, tuple] = {}
        self.cache: dict[str, tuple] = {}
        self.timing: dict[str, float] = {}
        self.curves: list[dict] = []
        self.exact = cells.EvalCache()

    def world(self, data: DataConfig):
        key = data.model_dump_json()
        if key not in self.worlds:
            cfg = self.cfg
            t0 = time.perf_counter()
            w = cells.build_world(data, cfg.world)
            evs = [cells.make_eval_set(w, cfg.eval, cfg.seeding.seed_for("eval_noise", s),
                                       cfg.seeding.seed_for("reference", s), self.exact) for s in cfg.seeds]
            pools = cells.build_pools(w, cfg.train, cfg.seeding, cfg.seeds)
            self.worlds[key] = (w, evs, pools, cells.teacher_metrics(w, evs, cfg.eval), cells.world_floor(w, cfg.eval))
            self.timing[f"world {world_name(data)}"] = time.perf_counter() - t0
        return self.worlds[key]

    def run(self, data: DataConfig, network: NetworkConfig, train: TrainConfig, label: str, params: dict,
            methods: tuple[str, ...] | None = None) -> cells.CellResult:
        cfg = self.cfg
        key = json.dumps([data.model_dump(), network.model_dump(), train.model_dump(), methods], sort_keys=True)
        full = json.dumps([data.model_dump(), network.model_dump(), train.model_dump(), None], sort_keys=True)
        if methods and full in self.cache:  # a cell with every method already holds these
            return self.cache[full][0]
        if key not in self.cache:
            w, evs, pools, _, _ = self.world(data)
            routes = [Route(w.teacher, w.solver, pools[s], label=f"exact {world_name(data)}") for s in cfg.seeds]
            t0 = time.perf_counter()
            res = cells.run_cell(STUDY, label, params, [w] * len(cfg.seeds), evs, routes, cfg.seeds, network, train,
                                 cfg.eval, cfg.seeding, cfg.curves, cfg.init_steps, self.progress, methods=methods)
            n_params = _params_count(network)
            for m in res.metrics:
                res.metrics[m]["params_count"] = [n_params] * len(cfg.seeds)
            self.timing[label] = time.perf_counter() - t0
            if res.recorder is not None:
                self.curves.append(res.recorder.to_dict(label=label, params=params))
            self.cache[key] = (res, w, evs)
        return self.cache[key][0]

    def regime(self, res: cells.CellResult, data: DataConfig, label: str, group: str, params: dict,
               methods: dict[str, cells.CellResult] | None = None) -> dict:
        """The schema entry; ``methods`` takes a method's numbers from another cell (the target sweep)."""
        _, evs, _, _, _ = self.world(data)
        src = {m: res for m in res.metrics} | (methods or {})
        per = {m: r.metrics[m] for m, r in src.items()}
        conv = {m: r.converged[m] for m, r in src.items() if m in r.converged}
        r = evidence.regime_entry(label, group, params, per, switches={"score_error": 0.0, "decoder": "identity"},
                                  converged=conv, world=world_name(data))
        r["eval_intervals"] = evidence.eval_intervals({m: src[m].per_sample[m] for m in evidence.METHODS if m in src},
                                                      self.cfg.eval.n_resamples, seed=self.cfg.eval.seed)
        r["spectra"] = {m: cells.spectra(s.outputs[m], evs) for m, s in src.items()}
        return evidence.add_differences(r)


def _params_count(network: NetworkConfig) -> int:
    """Trainable parameters of one member: weights and biases of every layer."""
    return sum(i * o + o for i, o in network.layer_sizes)


def world_name(data: DataConfig) -> str:
    return f"{data.preset} d={data.dim}"


def run(cfg: InductiveBiasConfig, out_dir=None, progress: bool | None = None, argv=None) -> dict:
    """Run the configured sweeps; return the metrics dict (``studies.evidence`` schema). With ``out_dir``
    the folder gets ``config.json``, ``metrics.json``, ``table.md`` and the figures (PNG + PDF)."""
    out = common.open_output(out_dir, cfg, argv, study=STUDY)
    common.set_threads(cfg.threads)
    t_start = time.perf_counter()
    R = _Runner(cfg, cfg.progress if progress is None else progress)
    base = cfg.data
    net = cfg.network.model_copy(update={"dim": base.dim})
    regimes: list[dict] = []
    if "capacity" in cfg.sweeps:
        for width, depth in cfg.capacity:
            n = net.model_copy(update={"width": width, "depth": depth})
            label, params = f"width={width} depth={depth}", {"width": width, "depth": depth}
            res = R.run(base, n, cfg.train, label, params)
            regimes.append(R.regime(res, base, label, "capacity", {**params, "params_count": _params_count(n)}))
    if "budget" in cfg.sweeps:
        for steps in cfg.budgets:
            tr = cfg.train.model_copy(update={"train_steps": steps, "warmup_steps": min(cfg.train.warmup_steps, steps // 4)})
            label = f"steps={steps}"
            res = R.run(base, net, tr, label, {"train_steps": steps})
            regimes.append(R.regime(res, base, label, "budget", {"train_steps": steps}))
    if "target" in cfg.sweeps:
        dcd = R.run(base, net, cfg.train, "target base (Direct CD)", {"ema": None}, methods=("direct_cd",))
        for mu in cfg.ema_rates:
            label = f"ema={mu}"
            cd = R.run(base, net, cfg.train.model_copy(update={"ema_rate": mu}), label, {"ema": mu}, methods=("cd",))
            regimes.append(R.regime(cd, base, label, "target", {"ema": mu}, methods={"direct_cd": dcd}))
    if "dimension" in cfg.sweeps:
        for d in cfg.dims:
            data = DataConfig(preset=cfg.dim_preset, dim=d, seed=base.seed,
                              n_modes=cfg.dim_modes if cfg.dim_preset == "random" else None)
            n = net.model_copy(update={"dim": d})
            label = (f"d={d} ({cfg.dim_preset}, {cfg.dim_modes} modes)" if cfg.dim_preset == "random"
                     else f"d={d} ({cfg.dim_preset})")
            res = R.run(data, n, cfg.train, label, {"dim": d})
            regimes.append(R.regime(res, data, label, "dimension", {"dim": d}))
    v = evidence.verdicts(regimes, "w2", quick=cfg.quick)
    v_p0 = evidence.verdicts(regimes, "mmd2", quick=cfg.quick)
    worlds = {world_name(DataConfig.model_validate_json(k)): v_ for k, v_ in R.worlds.items()}
    timing = {**R.timing, "total_seconds": time.perf_counter() - t_start}
    metrics = {
        "study": STUDY, "quick": cfg.quick,
        "budget": evidence.budget_block(cfg.train, cfg.init_steps, cfg.world.grid_size),
        "quality": {"key": "w2", "label": "W2 to the teacher's samples (exact teacher: p_0)", "higher_is_better": False},
        "quality_p0": {"key": "w2", "label": "W2 to p_0"},
        "alt_quality": {"key": "mmd2", "label": "MMD² to p_0"},
        "metric_keys": ["E", "E_exact", *cells.QUALITY_KEYS, "final_loss"],
        "regimes": regimes, "merged": [], "verdicts": v, "verdicts_mmd2": v_p0,
        "teacher": {k: w[3] for k, w in worlds.items()},
        "floor": {k: w[4] for k, w in worlds.items()},
        "curves": R.curves, "seeding": cfg.seeding.model_dump(), "timing": timing,
        "summary": evidence.summary_line(v, cfg.quick, "W2"),
    }
    if out is not None:
        cells.write_outputs(out, STUDY, metrics, table, plot)
        if R.curves:
            base_floor = metrics["floor"].get(world_name(base))
            plot_curves(R.curves, out / "curves.png", ["E", "E_exact", "w2"], cfg.quick,
                        "Inductive bias: training-budget curves", floor=base_floor)
    return metrics


def plot(metrics: dict, path) -> list:
    """Rows: E and W2; columns: one per sweep; CD vs Direct CD (mean ± std over seeds), floor bands."""
    groups = [g for g in ("capacity", "budget", "target", "dimension") if any(r["group"] == g for r in metrics["regimes"])]
    if not groups:
        return []
    fig, axes = plotting.new_figure(2, len(groups), size=(3.6, 3.0))
    for j, g in enumerate(groups):
        rs = [r for r in metrics["regimes"] if r["group"] == g]
        xs = list(range(len(rs)))
        for i, key in enumerate(("E", "w2")):
            ax = axes[i, j]
            for m in evidence.METHODS:
                mean = [r["methods"][m][key]["mean"] for r in rs]
                std = [r["methods"][m][key]["std"] for r in rs]
                dx = -0.08 if m == "cd" else 0.08  # side by side, not on top of each other
                ax.errorbar([x + dx for x in xs], mean, yerr=std, marker="o", capsize=3, ls="none",
                            color=plotting.METHOD_COLORS[m],
                            label=plotting.method_name(m))
            if key == "w2":  # one floor per world (the dimension sweep has several)
                for world in dict.fromkeys(r.get("world") for r in rs):
                    x = [i for i, r in enumerate(rs) if r.get("world") == world]
                    plotting.floor_band(ax, metrics["floor"].get(world, {}).get("w2"), span=(x[0] - 0.4, x[-1] + 0.4))
            ax.set_xticks(xs, [r["label"].split(" (")[0].replace(" ", "\n") for r in rs], fontsize=7)
            ax.set_xlim(-0.5, len(rs) - 0.5)
            ax.set_yscale("log")
            plotting.tidy_log_axes(ax)
            ax.set_ylabel(plotting.label(key), fontsize=6)
            ax.set_title(g, fontsize=9)
    plotting.legend_outside(fig, axes, ncol=3)
    fig.suptitle(plotting.title("Inductive bias (exact teacher, identity decoder): mean ± std over seeds",
                                metrics["quick"]), fontsize=10)
    return plotting.save(fig, path, rect=(0, 0.05, 1, 0.96))


def table(metrics: dict) -> str:
    parts = [f"# {STUDY}", "", metrics["summary"], "", cells.budget_line(metrics), "",
             cells.markdown_table(metrics["regimes"], TABLE_KEYS, metrics["quick"]), "",
             "Verdicts (quality W2 to p_0):", "", cells.verdict_table(metrics["verdicts"]), "",
             "Verdicts (quality MMD² to p_0):", "", cells.verdict_table(metrics["verdicts_mmd2"]), ""]
    for world, fl in metrics["floor"].items():
        parts.append(f"{world}: " + cells.floor_line(fl, ("w2", "mmd2")))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, InductiveBiasConfig, QUICK, run, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
