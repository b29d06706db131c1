"""Latent space: CD and Direct CD are trained in a latent space (exact GMM teacher there) and their
samples are judged after a decoder, as SDXL's are after its VAE. Does a lower latent ODE error
still mean better decoded samples?

``python -m studies.latent_space [--quick] [--set key=value ...]``

Students are trained once per (method, budget) in latent space — training never sees the decoder —
and every member is then evaluated under each decoder ``g`` of ``decoders`` (``toys.decoders``:
identity, a random MLP to D dims, a 16x16 render of the first two coordinates):

* ``E`` — latent ODE error, ``mean (f_theta(x_T) - f_solver(x_T))^2`` (paper eq. 6, as on SDXL latents);
* ``E_decoded`` — the same after decoding, ``mean (g(f_theta(x_T)) - g(f_solver(x_T)))^2``;
* ``fd`` — Frechet distance of the decoded samples to decoded data samples
  (``odecm.metrics.frechet_distance_features``, the FID formula on the decoded vectors);
* ``w2`` — W2 between decoded point sets; ``mmd2`` only for decoders of at most ``mmd_max_dim``
  outputs (its bandwidths are in data units);
* ``rank_correlation`` — per decoder, Spearman's rho between latent E and decoded FD over every
  trained student (methods x budgets x seeds).
"""
from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

from odecm.cli import run_main
from odecm.config import StrictModel
from odecm.metrics import frechet_distance_features, per_sample_sq_error
from toys.ensemble import TargetPool, TrainConfig
from toys.metrics import mmd2_unbiased, wasserstein2
from toys.networks import NetworkConfig

from . import cells
from .cells import DataConfig, EvalConfig, WorldConfig

STUDY = "latent_space"
METHODS = ("cd", "direct_cd")
Tensor = torch.Tensor


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


class LatentSpaceConfig(StrictModel):
    data: DataConfig = DataConfig()
    world: WorldConfig = WorldConfig()
    network: NetworkConfig = NetworkConfig(width=64, depth=3)
    train: TrainConfig = TrainConfig(train_steps=1500, batch_size=128, pool_size=2**16, log_every=100)
    eval: EvalConfig = EvalConfig()
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    budgets: list[int] = Field(default_factory=lambda: [500, 1500],
                               description="training iterations; each budget is a full run (more students "
                                           "for the E-vs-quality correlation)")
    decoders: list[DecoderSpec] = Field(default_factory=lambda: [
        DecoderSpec(kind="identity"), DecoderSpec(kind="random_mlp", out_dim=64), DecoderSpec(kind="render")])
    mmd_max_dim: int = Field(64, ge=1)
    init_steps: int = Field(0, ge=0, description="teacher-matching warm start before distillation (0 = random init)")
    threads: int | None = Field(1, ge=1)
    progress: bool = False


QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "network": {"width": 16, "depth": 2},
    "train": {"train_steps": 40, "pool_size": 2048, "batch_size": 64, "warmup_steps": 5, "log_every": 10},
    "eval": {"num_samples": 256, "max_points": 256},
    "world": {"grid_size": 8},
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
    outs = [dec(x[i:i + chunk].double()) for i in range(0, x.shape[0], chunk)]
    y = torch.cat(outs)
    return y.reshape(y.shape[0], -1).double()


def decoded_metrics(x: Tensor, solver_end: Tensor, dec, ref_dec: Tensor, solver_dec: Tensor, cfg: LatentSpaceConfig,
                    seed: int) -> dict[str, float]:
    """E_decoded, fd, w2 (and mmd2 for small D) of latent samples ``x`` under decoder ``dec``."""
    y = decode(dec, x)
    out = {"E_decoded": float(per_sample_sq_error(y, solver_dec).mean()),
           "fd": frechet_distance_features(y, ref_dec)}
    g = torch.Generator().manual_seed(seed)
    mp = cfg.eval.max_points
    iy = torch.randperm(y.shape[0], generator=g)[:mp]
    ir = torch.randperm(ref_dec.shape[0], generator=g)[:mp]
    out["w2"] = wasserstein2(y[iy], ref_dec[ir])
    if y.shape[1] <= cfg.mmd_max_dim:
        out["mmd2"] = mmd2_unbiased(y[iy], ref_dec[ir])
    return out


def run(cfg: LatentSpaceConfig) -> dict:
    from .report import spearman

    t0 = time.perf_counter()
    world = cells.build_world(cfg.data, cfg.world)
    ev = cells.make_eval_set(world, cfg.eval, floor=False)
    pool = TargetPool.build(world.teacher, world.solver, world.grid, world.schedule, world.sample_data,
                            cfg.train.pool_size, cfg.train.pool_seed)
    net = cfg.network.model_copy(update={"dim": cfg.data.dim})
    timing = {"world": time.perf_counter() - t0}
    # 1. students, trained once in latent space
    outputs: dict[tuple[str, int], Tensor] = {}
    latent: dict[tuple[str, int], dict[str, list[float]]] = {}
    for steps in cfg.budgets:
        tr = cfg.train.model_copy(update={"train_steps": steps, "warmup_steps": min(cfg.train.warmup_steps, steps // 4)})
        for method in METHODS:
            t1 = time.perf_counter()
            student, sec, loss = cells.train_cell(world, method, net, tr, cfg.seeds, pool, init_steps=cfg.init_steps,
                                                  progress=cfg.progress and f"{method} iters={steps}")
            metrics, out = cells.evaluate_members(student, world, ev, cfg.eval)
            metrics["final_loss"] = loss
            outputs[(method, steps)], latent[(method, steps)] = out, metrics
            timing[f"{method} iters={steps}"] = time.perf_counter() - t1
            cells.log(STUDY, f"{method} iters={steps}: {timing[f'{method} iters={steps}']:.0f} s")
    # 2. every decoder on every student
    regimes, rank_corr, floors, teacher = [], {}, {}, {}
    ref2 = world.gmm.sample_p0(cfg.eval.num_samples, torch.Generator().manual_seed(cfg.eval.seed + 2),
                               dtype=torch.float64)[0]
    scatter = {}
    for spec in cfg.decoders:
        t1 = time.perf_counter()
        dec = build_decoder(spec, cfg.data.dim)
        ref_dec, solver_dec = decode(dec, ev.reference), decode(dec, ev.solver_end)
        floors[spec.name] = {"fd": frechet_distance_features(decode(dec, ref2), ref_dec)}
        teacher[spec.name] = decoded_metrics(ev.solver_end, ev.solver_end, dec, ref_dec, solver_dec, cfg, cfg.eval.seed)
        teacher[spec.name]["out_dim"] = int(ref_dec.shape[1])
        pts = []
        for steps in cfg.budgets:
            per = {}
            for method in METHODS:
                out = outputs[(method, steps)]
                rows = [decoded_metrics(out[m], ev.solver_end, dec, ref_dec, solver_dec, cfg, cfg.eval.seed)
                        for m in range(out.shape[0])]
                vals = cells.collect(rows)
                lat = latent[(method, steps)]
                vals = {"E": lat["E"], "E_exact": lat.get("E_exact", []), "w2_latent": lat["w2"],
                        "final_loss": lat["final_loss"], **vals}
                per[method] = {k: v for k, v in vals.items() if v}
                pts += [(method, steps, e, f) for e, f in zip(lat["E"], vals["fd"])]
            regimes.append(cells.regime_entry(f"{spec.name} iters={steps}", "decoder",
                                              {"decoder": spec.name, "iters": steps,
                                               "out_dim": int(ref_dec.shape[1])}, per,
                                              switches={"score_error": 0.0, "decoder": spec.name}))
        rank_corr[spec.name] = spearman([p[2] for p in pts], [p[3] for p in pts])
        scatter[spec.name] = pts
        timing[f"decode {spec.name}"] = time.perf_counter() - t1
        cells.log(STUDY, f"decoder {spec.name}: {timing[f'decode {spec.name}']:.0f} s")
    return {
        "quality": {"key": "fd", "label": "Frechet distance of decoded samples to decoded data (lower = better)"},
        "metric_keys": ["E", "E_exact", "E_decoded", "fd", "w2", "mmd2", "w2_latent", "final_loss"],
        "alt_quality_keys": ["w2", "mmd2", "w2_latent"],
        "regimes": regimes,
        "rank_correlation": rank_corr,
        "scatter": scatter,
        "floor": floors,
        "teacher": teacher,
        "timing": timing,
        "summary": summarize(regimes, rank_corr),
    }


def summarize(regimes: list[dict], rank_corr: dict[str, float]) -> str:
    from .common import fmt
    from .report import regime_verdicts

    comps = regime_verdicts({"quality": {"key": "fd"}, "regimes": regimes})
    para = [c.label for c in comps if c.paradox]
    rho = ", ".join(f"{k} {fmt(v)}" for k, v in rank_corr.items())
    return (f"{len(para)}/{len(comps)} (decoder, budget) regimes show the paradox (CD lower decoded FD, "
            f"Direct CD lower latent E)" + (f": {', '.join(para)}" if para else "")
            + f". Spearman(latent E, decoded FD) over all students: {rho}.")


def plot(metrics: dict, path) -> None:
    from . import common

    decs = list(metrics["scatter"])
    if not decs:
        return
    fig, axes = common.new_figure(1, len(decs), size=(3.4, 3.2))
    budgets = sorted({p[1] for pts in metrics["scatter"].values() for p in pts})
    markers = dict(zip(budgets, "osD^v"))
    for j, d in enumerate(decs):
        ax = axes[0, j]
        for method, color in (("cd", "C0"), ("direct_cd", "C3")):
            for b in budgets:
                pts = [p for p in metrics["scatter"][d] if p[0] == method and p[1] == b]
                ax.scatter([p[2] for p in pts], [p[3] for p in pts], c=color, marker=markers[b], s=18,
                           label=f"{'CD' if method == 'cd' else 'Direct CD'} {b} it")
        fl = metrics["floor"].get(d, {}).get("fd")
        if fl is not None:
            ax.axhline(fl, color="gray", lw=0.8, ls=":", label="FD floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        cells.tidy_log_axes(ax)
        ax.set_xlabel("latent ODE error E")
        ax.set_ylabel("decoded FD")
        rho = metrics["rank_correlation"].get(d)
        ax.set_title(f"{d}: Spearman {rho:+.2f}" if rho == rho else d, fontsize=9)
        if j == 0:
            ax.legend(fontsize=6)
    fig.suptitle("Latent space: latent E vs decoded sample quality (one point per student)", fontsize=9)
    common.save_figure(fig, path)


def table(metrics: dict) -> str:
    from .common import fmt

    keys = ["E", "E_decoded", "fd", "w2", "mmd2", "w2_latent"]
    lines = [f"# {STUDY}", "", metrics["summary"], "", cells.markdown_table(metrics["regimes"], keys, []), "",
             "| decoder | out dim | Spearman(latent E, FD) | FD floor | teacher solver FD |", "|---|---|---|---|---|"]
    for d, rho in metrics["rank_correlation"].items():
        lines.append(f"| {d} | {metrics['teacher'][d]['out_dim']} | {fmt(rho)} | {fmt(metrics['floor'][d]['fd'])} | "
                     f"{fmt(metrics['teacher'][d]['fd'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cells.run_study(STUDY, LatentSpaceConfig, QUICK, run, table, plot, argv, __doc__.splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
