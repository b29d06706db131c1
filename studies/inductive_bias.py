"""Inductive bias: with the exact teacher and no decoder, only the objective differs between CD and
Direct CD. Does CD still give better samples although Direct CD has the lower ODE error E?

``python -m studies.inductive_bias [--quick] [--set key=value ...]``

Sweeps (each one factor away from the base point ``network.width/depth``, ``train.train_steps``,
``train.ema_rate``, all with the exact GMM teacher and the identity decoder):

* ``capacity`` — student (width, depth) pairs;
* ``budget`` — training iterations (each a full run with its own cosine schedule);
* ``target`` — CD's target policy: EMA rates mu (0 = the online student under stop-gradient, the
  paper's choice); Direct CD has no target network, so its base run is the reference;
* ``dimension`` — issue item 6, "where does the paradox appear?": the ``random`` preset with
  ``dim_modes`` modes in d = ``dims`` at the base capacity and budget.

Per regime and method: E (eq. 6, against the teacher solver), E_exact (against the exact ODE) and
sample quality (W2, MMD^2, mode coverage, ...) of the one-step samples, mean ± std over seeds.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import Field

from odecm.cli import run_main
from odecm.config import StrictModel
from toys.ensemble import TargetPool, TrainConfig
from toys.networks import NetworkConfig, count_parameters

from . import cells
from .cells import DataConfig, EvalConfig, WorldConfig

STUDY = "inductive_bias"
METHODS = ("cd", "direct_cd")
Sweep = Literal["capacity", "budget", "target", "dimension"]


class InductiveBiasConfig(StrictModel):
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, pool_size=2**16, log_every=100)
    eval: EvalConfig = EvalConfig()
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    sweeps: list[Sweep] = Field(default_factory=lambda: ["capacity", "budget", "target", "dimension"])
    capacity: list[tuple[int, int]] = Field(default_factory=lambda: [(16, 3), (64, 3), (256, 3), (64, 1), (64, 5)],
                                            description="(width, depth) pairs")
    budgets: list[int] = Field(default_factory=lambda: [500, 1500, 5000])
    ema_rates: list[float] = Field(default_factory=lambda: [0.0, 0.9, 0.99, 0.999])
    dims: list[int] = Field(default_factory=lambda: [2, 16, 64])
    dim_preset: Literal["ring8", "grid25", "twoscale", "imbalanced", "aniso", "random"] = "random"
    dim_modes: int = Field(32, ge=1, description="modes of the 'random' preset in the dimension sweep")
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    threads: int | None = Field(1, ge=1, description="torch threads (small MLPs: 1 is fastest on shared cores)")
    progress: bool = False


QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256},
    "world": {"grid_size": 8},
    "capacity": [[8, 2], [16, 2]],
    "budgets": [20, 40],
    "ema_rates": [0.0, 0.9],
    "dims": [2, 4],
    "dim_modes": 4,
}


class _Runner:
    """Trains each (world, network, train, method) point once and caches its per-member metrics."""

    def __init__(self, cfg: InductiveBiasConfig):
        self.cfg = cfg
        self.worlds: dict[str, tuple] = {}
        self.cache: dict[str, dict] = {}
        self.timing: dict[str, float] = {}

    def world(self, data: DataConfig):
        key = data.model_dump_json()
        if key not in self.worlds:
            w = cells.build_world(data, self.cfg.world)
            t0 = time.perf_counter()
            ev = cells.make_eval_set(w, self.cfg.eval)
            pool = TargetPool.build(w.teacher, w.solver, w.grid, w.schedule, w.sample_data,
                                    self.cfg.train.pool_size, self.cfg.train.pool_seed)
            self.timing[f"world {data.preset} d={data.dim}"] = time.perf_counter() - t0
            self.worlds[key] = (w, ev, pool, cells.teacher_metrics(w, ev, self.cfg.eval))
        return self.worlds[key]

    def run(self, data: DataConfig, network: NetworkConfig, train: TrainConfig, method: str) -> dict:
        key = json.dumps([data.model_dump(), network.model_dump(), train.model_dump(), method], sort_keys=True)
        if key not in self.cache:
            w, ev, pool, _ = self.world(data)
            student, sec, loss = cells.train_cell(w, method, network, train, self.cfg.seeds, pool,
                                                  init_steps=self.cfg.init_steps,
                                                  progress=self.cfg.progress and f"{method} w{network.width}d{network.depth} "
                                                           f"s{train.train_steps} mu{train.ema_rate} D{data.dim}")
            metrics, _ = cells.evaluate_members(student, w, ev, self.cfg.eval)
            metrics["final_loss"] = loss
            metrics["train_seconds"] = [sec / len(self.cfg.seeds)] * len(self.cfg.seeds)
            metrics["params_count"] = [count_parameters(student.net) / len(self.cfg.seeds)] * len(self.cfg.seeds)
            self.cache[key] = metrics
            cells.log(STUDY, f"{method} width={network.width} depth={network.depth} steps={train.train_steps} "
                             f"ema={train.ema_rate} {data.preset} d={data.dim}: train {sec:.0f} s, "
                             f"E {sum(metrics['E']) / len(metrics['E']):.3g}, W2 {sum(metrics['w2']) / len(metrics['w2']):.3g}")
        return self.cache[key]


def run(cfg: InductiveBiasConfig) -> dict:
    """Run the configured sweeps; return the metrics dict (regime schema of ``studies.report``)."""
    R = _Runner(cfg)
    base_data = cfg.data
    net = cfg.network.model_copy(update={"dim": base_data.dim})
    regimes: list[dict] = []

    def both(data, network, train, label, group, params, methods=METHODS):
        per = {m: R.run(data, network, train, m) for m in methods}
        r = cells.regime_entry(label, group, params, per, switches={"score_error": 0.0, "decoder": "identity"})
        r["world"] = world_name(data)
        return r

    if "capacity" in cfg.sweeps:
        for width, depth in cfg.capacity:
            n = net.model_copy(update={"width": width, "depth": depth})
            r = both(base_data, n, cfg.train, f"width={width} depth={depth}", "capacity",
                     {"width": width, "depth": depth})
            r["params"]["params_count"] = r["methods"]["cd"]["params_count"]["mean"]
            regimes.append(r)
    if "budget" in cfg.sweeps:
        for steps in cfg.budgets:
            tr = cfg.train.model_copy(update={"train_steps": steps, "warmup_steps": min(cfg.train.warmup_steps, steps // 4)})
            regimes.append(both(base_data, net, tr, f"iters={steps}", "budget", {"iters": steps}))
    if "target" in cfg.sweeps:
        dcd = R.run(base_data, net, cfg.train, "direct_cd")
        for mu in cfg.ema_rates:
            cd = R.run(base_data, net, cfg.train.model_copy(update={"ema_rate": mu}), "cd")
            regimes.append(cells.regime_entry(f"ema={mu}", "target", {"ema": mu}, {"cd": cd, "direct_cd": dcd},
                                              switches={"score_error": 0.0, "decoder": "identity"}))
            regimes[-1]["world"] = world_name(base_data)
    if "dimension" in cfg.sweeps:
        for d in cfg.dims:
            data = DataConfig(preset=cfg.dim_preset, dim=d, seed=base_data.seed,
                              n_modes=cfg.dim_modes if cfg.dim_preset == "random" else None)
            n = net.model_copy(update={"dim": d})
            regimes.append(both(data, n, cfg.train, f"d={d} ({cfg.dim_preset}, {cfg.dim_modes} modes)"
                                if cfg.dim_preset == "random" else f"d={d} ({cfg.dim_preset})",
                                "dimension", {"dim": d}))
    teachers = {world_name(DataConfig.model_validate_json(k)): v[3] for k, v in R.worlds.items()}
    floors = {world_name(DataConfig.model_validate_json(k)): v[1].floor for k, v in R.worlds.items()}
    return {
        "quality": {"key": "w2", "label": "W2 of one-step samples to data (lower = better)"},
        "metric_keys": ["E", "E_exact", *cells.QUALITY_KEYS],
        "alt_quality_keys": ["sliced_w2", "mmd2", "mode_tv"],
        "regimes": regimes,
        "teacher": teachers,
        "floor": floors,
        "timing": R.timing,
        "summary": summarize(regimes),
    }


def world_name(data: DataConfig) -> str:
    return f"{data.preset} d={data.dim}"


def summarize(regimes: list[dict]) -> str:
    from .report import regime_verdicts

    comps = regime_verdicts({"quality": {"key": "w2"}, "regimes": regimes})
    para = [c.label for c in comps if c.paradox]
    return (f"{len(para)}/{len(comps)} regimes show the paradox (CD lower W2, Direct CD lower E)"
            + (f": {', '.join(para)}." if para else "."))


def plot(metrics: dict, path) -> None:
    """Rows: E and W2; columns: one per sweep; CD vs Direct CD with seed std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("capacity", "budget", "target", "dimension") if any(r["group"] == g for r in metrics["regimes"])]
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6), squeeze=False)
    for j, g in enumerate(groups):
        rs = [r for r in metrics["regimes"] if r["group"] == g]
        xs = list(range(len(rs)))
        for i, key in enumerate(("E", "w2")):
            ax = axes[i, j]
            for m, color in (("cd", "C0"), ("direct_cd", "C3")):
                mean = [r["methods"][m][key]["mean"] for r in rs]
                std = [r["methods"][m][key]["std"] for r in rs]
                ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=color,
                            label={"cd": "CD", "direct_cd": "Direct CD"}[m])
            if key == "w2":
                fl = [metrics["floor"].get(r.get("world", ""), {}).get("w2") for r in rs]
                if all(f is not None for f in fl):
                    ax.plot(xs, fl, ls=":", color="gray", marker="_", label="finite-sample floor")
            ax.set_xticks(xs, [r["label"].split(" (")[0].replace(" ", "\n") for r in rs], fontsize=7)
            if key == "E":
                ax.set_yscale("log")
            cells.tidy_log_axes(ax)
            ax.set_title(f"{g}: {'ODE error E' if key == 'E' else 'W2 to data'}", fontsize=9)
            if j == 0 or key == "w2" and j == len(groups) - 1:
                ax.legend(fontsize=7)
    fig.suptitle("Inductive bias (exact teacher, identity decoder); mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(metrics: dict) -> str:
    keys = ["E", "E_exact", "w2", "mmd2", "modes_covered", "final_loss"]
    parts = [f"# {STUDY}\n", metrics["summary"], "",
             cells.markdown_table(metrics["regimes"], keys, [])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, InductiveBiasConfig, QUICK, run, table, plot, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
