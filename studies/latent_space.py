"""Latent space: CD and Direct CD are trained in a latent space (exact GMM teacher there) and their
samples are judged after a decoder, as SDXL's are after its VAE. Does a lower latent ODE error
still mean better decoded samples?

``python -m studies.latent_space [--quick] [--config FILE] [--set key=value ...] [--out DIR]``
``metrics = studies.latent_space.run(cfg)`` (Python; ``out_dir=None`` writes nothing)

Students are trained once per (method, budget) in latent space — training never sees the decoder —
and every member is then evaluated under each decoder ``g`` of ``decoders`` (``toys.decoders``:
identity, a random MLP to D dims, a 16x16 render of the first two coordinates):

* ``E`` — latent ODE error, ``mean (f_theta(x_T) - f_solver(x_T))^2`` (paper eq. 6, as on SDXL latents);
* ``E_decoded`` — the same after decoding, ``mean (g(f_theta(x_T)) - g(f_solver(x_T)))^2``;
* ``fd`` — Frechet distance of the decoded samples to decoded p_0 samples (the exact teacher's
  distribution; ``odecm.metrics.frechet_distance_features``, the FID formula on the decoded vectors);
* ``w2`` — W2 between decoded point sets; ``mmd2`` only for decoders of at most ``mmd_max_dim``
  outputs (its bandwidths are in data units);
* ``rank_correlation`` — per decoder, Spearman's rho between latent E and decoded FD over every
  trained student (methods x budgets x seeds).

Each seed varies the initialisation, batches, pool, evaluation noise and reference (``studies.seeding``);
per (decoder, budget) regime the verdict compares E with decoded FD, corrected across regimes.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from odecm.cli import run_main
from odecm.config import StrictModel
from odecm.metrics import frechet_distance_features, per_sample_sq_error
from toys.ensemble import Route, TrainConfig
from toys.metrics import mmd2_unbiased, wasserstein2
from toys.networks import NetworkConfig

from . import cells, common, evidence, plotting
from .cells import DataConfig, EvalConfig, WorldConfig
from .curves import CurveConfig, TrainedStudyConfig, check_curve_budget, plot_curves
from .seeding import SeedConfig

STUDY = "latent_space"
Tensor = torch.Tensor
TABLE_KEYS = ("E", "E_decoded", "fd", "w2", "mmd2", "w2_latent")


class DecoderSpec(StrictModel):
    """One decoder of ``toys.decoders``: ``identity``, ``random_mlp`` (to ``out_dim`` dims) or ``render``
    (a ``size x size`` Gaussian-blob image of the first two latent coordinates)."""

    kind: Literal["identity", "random_mlp", "render"]
    out_dim: int = Field(64, ge=1, description="output dimension D (random_mlp)")
    size: int = Field(16, ge=2, description="image side (render)")
    seed: int = 0

    @property
    def name(self) -> str:
        return {"identity": "identity", "random_mlp": f"mlp{self.out_dim}",
                "render": f"render{self.size}x{self.size}"}[self.kind]


class LatentSpaceConfig(TrainedStudyConfig):
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
    budgets: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [500, 1500],
                               description="training steps; each budget is a full run (more students "
                                           "for the E-vs-quality correlation)")
    decoders: list[DecoderSpec] = Field(default_factory=lambda: [
        DecoderSpec(kind="identity"), DecoderSpec(kind="random_mlp", out_dim=64), DecoderSpec(kind="render")])
    mmd_max_dim: int = Field(64, ge=1)
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    curves: CurveConfig = CurveConfig()
    threads: int | None = Field(1, ge=1)
    progress: bool = False

    @field_validator("seeds", "budgets")
    @classmethod
    def _distinct(cls, v: list) -> list:
        return common.distinct(v)

    @field_validator("decoders")
    @classmethod
    def _distinct_decoders(cls, v: list[DecoderSpec]) -> list[DecoderSpec]:
        common.distinct([d.name for d in v])  # results are keyed by decoder name
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.curves.enabled and self.budgets != [self.train.train_steps]:
            raise ValueError(f"curves.enabled: set budgets=[{self.train.train_steps}] (the curve holds every budget)")
        check_curve_budget(self.curves, self.train)
        return self


QUICK: dict[str, Any] = {
    "quick": True,
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256, "n_resamples": 200},
    "world": {"grid_size": 10},
    "budgets": [20, 40],
}


class _FirstTwo(torch.nn.Module):
    """Apply a 2D decoder to the first two latent coordinates (render in d > 2)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, z: Tensor) -> Tensor:
        return self.inner(z[:, :2])


def build_decoder(spec: DecoderSpec, latent_dim: int) -> torch.nn.Module:
    """``toys.decoders.make_decoder`` for a spec, in float64 and eval mode."""
    from toys.decoders import make_decoder

    if spec.kind == "identity":
        dec = make_decoder("identity", latent_dim=latent_dim)
    elif spec.kind == "random_mlp":
        dec = make_decoder("random_mlp", latent_dim=latent_dim, out_dim=spec.out_dim, seed=spec.seed)
    else:
        dec = make_decoder("render", size=spec.size)
        if latent_dim > 2:
            dec = _FirstTwo(dec)
    return dec.double().eval().requires_grad_(False)


@torch.no_grad()
def decode(dec, x: Tensor, chunk: int = 4096) -> Tensor:
    """Decoded points flattened to ``(n, D)`` in float64."""
    y = torch.cat([dec(x[i:i + chunk].double()) for i in range(0, x.shape[0], chunk)])
    return y.reshape(y.shape[0], -1).double()


def decoded_metrics(x: Tensor, dec, ref_dec: Tensor, solver_dec: Tensor, cfg: LatentSpaceConfig,
                    seed: int) -> tuple[dict[str, float], np.ndarray]:
    """E_decoded, fd, w2 (and mmd2 for small D) of latent samples ``x`` under decoder ``dec``; also the
    per-sample decoded errors."""
    y = decode(dec, x)
    e_i = per_sample_sq_error(y, solver_dec)
    out = {"E_decoded": float(e_i.mean()), "fd": frechet_distance_features(y, ref_dec)}
    g = torch.Generator().manual_seed(seed)
    mp = cfg.eval.max_points
    iy = torch.randperm(y.shape[0], generator=g)[:mp]
    ir = torch.randperm(ref_dec.shape[0], generator=g)[:mp]
    out["w2"] = wasserstein2(y[iy], ref_dec[ir])
    if y.shape[1] <= cfg.mmd_max_dim:
        out["mmd2"] = mmd2_unbiased(y[iy], ref_dec[ir])
    return out, e_i.numpy()


def decoder_floor(world: cells.World, dec, cfg: LatentSpaceConfig) -> dict[str, dict]:
    """FD between two independent decoded p_0 samples of the evaluation size, over >= 10 draws."""
    n = cfg.eval.num_samples

    def draw(s: int) -> dict[str, float]:
        a = world.gmm.sample_p0(n, torch.Generator().manual_seed(s + 1), dtype=torch.float64)[0]
        b = world.gmm.sample_p0(n, torch.Generator().manual_seed(s + 2), dtype=torch.float64)[0]
        return {"fd": frechet_distance_features(decode(dec, a), decode(dec, b))}
    return evidence.floor_block(draw, cfg.eval.floor_draws, seed=cfg.eval.seed)


def run(cfg: LatentSpaceConfig, out_dir=None, progress: bool | None = None, argv=None) -> dict:
    """Run the study; return the metrics dict (``studies.evidence`` schema). With ``out_dir`` the folder
    gets ``config.json``, ``metrics.json``, ``table.md`` and the figures (PNG + PDF)."""
    from scipy.stats import spearmanr

    out = common.open_output(out_dir, cfg, argv, study=STUDY)
    common.set_threads(cfg.threads)
    progress = cfg.progress if progress is None else progress
    t_start = time.perf_counter()
    seeds = list(cfg.seeds)
    world = cells.build_world(cfg.data, cfg.world)
    evs = [cells.make_eval_set(world, cfg.eval, cfg.seeding.seed_for("eval_noise", s),
                               cfg.seeding.seed_for("reference", s)) for s in seeds]
    pools = cells.build_pools(world, cfg.train, cfg.seeding, seeds)
    routes = [Route(world.teacher, world.solver, pools[s], label="exact (latent)") for s in seeds]
    net = cfg.network.model_copy(update={"dim": cfg.data.dim})
    timing = {"world": time.perf_counter() - t_start}
    # 1. students, trained once in latent space
    cellres: dict[int, cells.CellResult] = {}
    curves = []
    for steps in cfg.budgets:
        tr = cfg.train.model_copy(update={"train_steps": steps, "warmup_steps": min(cfg.train.warmup_steps, steps // 4)})
        t1 = time.perf_counter()
        cellres[steps] = cells.run_cell(STUDY, f"steps={steps}", {"train_steps": steps}, [world] * len(seeds), evs,
                                        routes, seeds, net, tr, cfg.eval, cfg.seeding, cfg.curves, cfg.init_steps,
                                        progress)
        timing[f"steps={steps}"] = time.perf_counter() - t1
        if cellres[steps].recorder is not None:
            curves.append(cellres[steps].recorder.to_dict(label=f"latent, steps={steps}"))
    # 2. every decoder on every student
    regimes, rank_corr, floors, teacher, scatter = [], {}, {}, {}, {}
    for spec in cfg.decoders:
        t1 = time.perf_counter()
        dec = build_decoder(spec, cfg.data.dim)
        refs = [decode(dec, ev.reference) for ev in evs]
        solver_decs = [decode(dec, ev.solver_end) for ev in evs]
        floors[spec.name] = decoder_floor(world, dec, cfg)
        trows = [decoded_metrics(ev.solver_end, dec, refs[k], solver_decs[k], cfg, cfg.eval.seed)[0]
                 for k, ev in enumerate(evs)]
        teacher[spec.name] = {k: common.stat(v) for k, v in cells.collect(trows).items()}
        teacher[spec.name]["out_dim"] = int(refs[0].shape[1])
        pts = []
        for steps, res in cellres.items():
            per, samples = {}, {}
            for method, lat in res.metrics.items():
                rows = [decoded_metrics(res.outputs[method][k], dec, refs[k], solver_decs[k], cfg, cfg.eval.seed)
                        for k in range(len(seeds))]
                vals = cells.collect([r[0] for r in rows])
                per[method] = {"E": lat["E"], "E_exact": lat.get("E_exact", []), "w2_latent": lat["w2"],
                               "final_loss": lat["final_loss"], **vals}
                samples[method] = {"E": res.per_sample[method]["E"], "E_decoded": [r[1] for r in rows]}
                pts += [(method, steps, e, f) for e, f in zip(lat["E"], vals["fd"])]
            r = evidence.regime_entry(f"{spec.name} steps={steps}", "decoder",
                                      {"decoder": spec.name, "train_steps": steps, "out_dim": int(refs[0].shape[1])},
                                      per, switches={"score_error": 0.0, "decoder": spec.name},
                                      converged=res.converged)
            r["eval_intervals"] = evidence.eval_intervals({m: samples[m] for m in evidence.METHODS},
                                                          cfg.eval.n_resamples, seed=cfg.eval.seed)
            regimes.append(evidence.add_differences(r))
        rho = spearmanr([p[2] for p in pts], [p[3] for p in pts]).statistic if len(pts) > 2 else float("nan")
        rank_corr[spec.name] = float(rho)
        scatter[spec.name] = pts
        timing[f"decode {spec.name}"] = time.perf_counter() - t1
        cells.log(STUDY, f"decoder {spec.name}: {timing[f'decode {spec.name}']:.0f} s")
    v = evidence.verdicts(regimes, "fd", quick=cfg.quick)
    timing["total_seconds"] = time.perf_counter() - t_start
    metrics = {
        "study": STUDY, "quick": cfg.quick,
        "budget": evidence.budget_block(cfg.train, cfg.init_steps, cfg.world.grid_size, budgets=cfg.budgets),
        "quality": {"key": "fd", "label": "Frechet distance of decoded samples to decoded teacher samples (= p_0)",
                    "higher_is_better": False},
        "quality_p0": {"key": "fd", "label": "Frechet distance of decoded samples to decoded p_0"},
        "metric_keys": ["E", "E_exact", "E_decoded", "fd", "w2", "mmd2", "w2_latent", "final_loss"],
        "alt_quality_keys": ["w2", "mmd2", "w2_latent"],
        "regimes": regimes, "merged": [], "verdicts": v,
        "rank_correlation": rank_corr, "scatter": scatter, "floor": floors, "teacher": teacher,
        "curves": curves, "seeding": cfg.seeding.model_dump(), "timing": timing,
        "summary": summarize(v, rank_corr, cfg.quick),
    }
    if out is not None:
        cells.write_outputs(out, STUDY, metrics, table, plot)
        if curves:
            plot_curves(curves, out / "curves.png", ["E", "E_exact", "w2"], cfg.quick,
                        "Latent space: training-budget curves (latent metrics)")
    return metrics


def summarize(v: dict, rank_corr: dict[str, float], quick: bool) -> str:
    rho = ", ".join(f"{k} {common.fmt(r)}" for k, r in rank_corr.items())
    return (evidence.summary_line(v, quick, "decoded FD")
            + f" Spearman(latent E, decoded FD) over all students: {rho}.")


def plot(metrics: dict, path) -> list:
    decs = list(metrics["scatter"])
    if not decs:
        return []
    fig, axes = plotting.new_figure(1, len(decs), size=(3.6, 3.6))
    budgets = sorted({p[1] for pts in metrics["scatter"].values() for p in pts})
    markers = dict(zip(budgets, "osD^v"))
    for j, d in enumerate(decs):
        ax = axes[0, j]
        for method in evidence.METHODS:
            for b in budgets:
                pts = [p for p in metrics["scatter"][d] if p[0] == method and p[1] == b]
                ax.scatter([p[2] for p in pts], [p[3] for p in pts], c=plotting.METHOD_COLORS[method],
                           marker=markers[b], s=18, label=f"{plotting.method_name(method)}, {b} steps")
        plotting.floor_band(ax, metrics["floor"].get(d, {}).get("fd"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        plotting.tidy_log_axes(ax)
        ax.set_xlabel("latent E: MSE to the teacher solver's endpoint\n(latent units²)", fontsize=7)
        ax.set_ylabel("FD of decoded samples to decoded data\n(decoded units²)", fontsize=7)
        rho = metrics["rank_correlation"].get(d)
        ax.set_title(f"decoder {d}: Spearman {rho:+.2f}" if rho == rho else f"decoder {d}", fontsize=9)
    plotting.legend_outside(fig, axes, ncol=4)
    fig.suptitle(plotting.title("Latent space: latent E vs decoded sample quality (one point per student)",
                                metrics["quick"]), fontsize=9)
    return plotting.save(fig, path, rect=(0, 0.12, 1, 0.95))


def table(metrics: dict) -> str:
    fmt = common.fmt
    lines = [f"# {STUDY}", "", metrics["summary"], "", cells.budget_line(metrics), "",
             cells.markdown_table(metrics["regimes"], TABLE_KEYS, metrics["quick"]), "",
             "Verdicts (quality: decoded FD):", "", cells.verdict_table(metrics["verdicts"]), "",
             "| decoder | out dim | Spearman(latent E, FD) | FD floor (mean ± sd) | teacher solver FD |", "|---|---|---|---|---|"]
    for d, rho in metrics["rank_correlation"].items():
        fl = metrics["floor"][d]["fd"]
        lines.append(f"| {d} | {metrics['teacher'][d]['out_dim']} | {fmt(rho)} | {fmt(fl['mean'])} ± {fmt(fl['sd'], 2)} | "
                     f"{fmt(metrics['teacher'][d]['fd']['mean'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, LatentSpaceConfig, QUICK, run, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
