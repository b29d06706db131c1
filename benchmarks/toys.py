"""Toy benchmarks: exact GMM score throughput, batched ensemble speed-up, one CD / Direct CD run.

    python -m benchmarks.toys [--threads 1] [--speedup-steps 100] [--members 8] [--skip-runs]

1. exact score of ring8 (K=8, d=2, float32), batch 1e6, shared t: evals/s (best of 3);
2. an ensemble of ``--members`` students (study defaults: width 64, depth 3, batch 128 per member,
   the world of ``studies.score_error``: SDXL schedule in the paper's indexing, skip grid N=20 ending at
   clean data, exact teacher, DDIM) trained for ``--speedup-steps`` steps at once,
   against the same members trained one after another; target: >= 3x faster (CD and Direct CD);
3. wall time of one full CD and one full Direct CD training run (one member) at the defaults of
   ``python -m studies.score_error`` (``train.train_steps`` steps), including its Direct CD pool build.
"""
from __future__ import annotations

import argparse
import time

import torch

from studies.cells import make_world_schedule
from toys.ensemble import Route, TargetPool, make_ensemble_student, train_ensemble
from toys.gmm import make_preset


def score_rate(batch: int = 1_000_000, repeats: int = 3) -> float:
    gmm = make_preset("ring8")
    sch = make_world_schedule("sdxl", timestep_offset=1)  # the studies' schedule (paper indexing)
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
    """The world of ``python -m studies.score_error`` at its defaults (``studies.score_error_world.World``: SDXL's
    schedule in the paper's indexing, the skip grid, exact ring8 teacher) and the pool seed of run seed 0."""
    from studies.score_error import ScoreErrorConfig
    from studies.score_error_world import World

    cfg = ScoreErrorConfig()
    world = World(cfg)
    return cfg, world, cfg.seeding.seed_for("pool", 0)


def _student(cfg, world, seeds):
    return make_ensemble_student(cfg.network, world.schedule, seeds, boundary=cfg.boundary, t_min=world.t_0)


def ensemble_speedup(members: int, steps: int) -> dict[str, dict[str, float]]:
    cfg, world, pool_seed = _setup()
    teacher, sch, grid, sample = world.true_den, world.schedule, world.grid, world.sample_data
    pool = TargetPool.build(teacher, "ddim", grid, sch, sample, cfg.train.pool_size, pool_seed)
    route = Route(teacher, "ddim", pool)
    out = {}
    for method in ("cd", "direct_cd"):
        tc = cfg.train.model_copy(update={"method": method, "train_steps": steps})
        ens = train_ensemble(tc, _student(cfg, world, list(range(members))), route, grid, sample,
                             progress=False).seconds
        seq = sum(train_ensemble(tc, _student(cfg, world, [seed]), route, grid, sample, progress=False).seconds
                  for seed in range(members))
        out[method] = {"ensemble_s": ens, "sequential_s": seq, "speedup": seq / ens}
    return out


def full_runs() -> dict[str, float]:
    cfg, world, pool_seed = _setup()
    teacher, sch, grid, sample = world.true_den, world.schedule, world.grid, world.sample_data
    t0 = time.perf_counter()
    pool = TargetPool.build(teacher, "ddim", grid, sch, sample, cfg.train.pool_size, pool_seed)
    out = {"pool_build_s": time.perf_counter() - t0, "steps": cfg.train.train_steps}
    for method in ("cd", "direct_cd"):
        tc = cfg.train.model_copy(update={"method": method})
        out[f"{method}_s"] = train_ensemble(tc, _student(cfg, world, [0]), Route(teacher, "ddim", pool), grid, sample,
                                            progress=False).seconds
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
