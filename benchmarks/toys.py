"""Toy benchmarks: exact GMM score throughput, batched ensemble speed-up, one CD / Direct CD run.

    python -m benchmarks.toys [--threads 1] [--speedup-steps 100] [--members 8] [--skip-runs]

1. exact score of ring8 (K=8, d=2, float32), batch 1e6, shared t: evals/s (best of 3);
2. an ensemble of ``--members`` students (study defaults: width 64, depth 3, batch 128 per member,
   SDXL schedule, skip grid N=20, exact teacher, DDIM) trained for ``--speedup-steps`` steps at once,
   against the same members trained one after another; target: >= 3x faster (CD and Direct CD);
3. wall time of one full CD and one full Direct CD training run (one member) at the defaults of
   ``python -m studies.score_error`` (``train.train_steps`` steps), including its Direct CD pool build.
"""
from __future__ import annotations

import argparse
import time

import torch

from odecm.grids import make_grid
from odecm.schedules import make_schedule
from toys.ensemble import Route, TargetPool, make_ensemble_student, train_ensemble
from toys.gmm import make_preset


def score_rate(batch: int = 1_000_000, repeats: int = 3) -> float:
    gmm = make_preset("ring8")
    sch = make_schedule("sdxl")
    x = torch.randn(batch, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    gmm.score(x, t, sch)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        gmm.score(x, t, sch)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def _setup():
    from studies.score_error import ScoreErrorConfig

    cfg = ScoreErrorConfig()
    gmm = make_preset(cfg.preset)
    sch = make_schedule(cfg.schedule)
    grid = make_grid(cfg.grid, sch, cfg.grid_size)
    teacher = gmm.exact_denoiser(sch)
    sample = lambda n, g: gmm.sample_p0(n, g)[0]  # noqa: E731
    return cfg, sch, grid, teacher, sample


def ensemble_speedup(members: int, steps: int) -> dict[str, dict[str, float]]:
    cfg, sch, grid, teacher, sample = _setup()
    pool = TargetPool.build(teacher, "ddim", grid, sch, sample, cfg.train.pool_size, cfg.train.pool_seed)
    route = Route(teacher, "ddim", pool)
    out = {}
    for method in ("cd", "direct_cd"):
        tc = cfg.train.model_copy(update={"method": method, "train_steps": steps})
        st = make_ensemble_student(cfg.network, sch, list(range(members)), boundary=cfg.boundary)
        ens = train_ensemble(tc, st, route, grid, sample, progress=False).seconds
        seq = 0.0
        for seed in range(members):
            st = make_ensemble_student(cfg.network, sch, [seed], boundary=cfg.boundary)
            seq += train_ensemble(tc, st, route, grid, sample, progress=False).seconds
        out[method] = {"ensemble_s": ens, "sequential_s": seq, "speedup": seq / ens}
    return out


def full_runs() -> dict[str, float]:
    cfg, sch, grid, teacher, sample = _setup()
    t0 = time.perf_counter()
    pool = TargetPool.build(teacher, "ddim", grid, sch, sample, cfg.train.pool_size, cfg.train.pool_seed)
    out = {"pool_build_s": time.perf_counter() - t0, "steps": cfg.train.train_steps}
    for method in ("cd", "direct_cd"):
        st = make_ensemble_student(cfg.network, sch, [0], boundary=cfg.boundary)
        tc = cfg.train.model_copy(update={"method": method})
        out[f"{method}_s"] = train_ensemble(tc, st, Route(teacher, "ddim", pool), grid, sample, progress=False).seconds
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.toys", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--speedup-steps", type=int, default=100)
    ap.add_argument("--skip-runs", action="store_true", help="skip the two full training runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads}
    res["score_evals_per_s"] = score_rate()
    print(f"exact GMM score (ring8, K=8, d=2, float32, batch 1e6): {res['score_evals_per_s']:.3g} evals/s")
    res["ensemble"] = ensemble_speedup(args.members, args.speedup_steps)
    for m, r in res["ensemble"].items():
        flag = "ok" if r["speedup"] >= 3 else "BELOW 3x"
        print(f"{m}: ensemble of {args.members} {r['ensemble_s']:.1f} s vs sequential {r['sequential_s']:.1f} s "
              f"({args.speedup_steps} steps): {r['speedup']:.1f}x [{flag}]")
    if not args.skip_runs:
        res["full_runs"] = fr = full_runs()
        print(f"one member, {fr['steps']} steps: CD {fr['cd_s']:.1f} s, Direct CD {fr['direct_cd_s']:.1f} s "
              f"(+ pool build {fr['pool_build_s']:.1f} s)")
    return res


if __name__ == "__main__":
    main()
