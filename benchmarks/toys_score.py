"""Throughput of the exact GMM score (point-evaluations per second).

    python -m benchmarks.toys_score [--batch 1000000] [--threads 2] [--repeats 5]

Prints evals/s (best of ``--repeats``) for the exact score, eps-denoiser and log-density of
ring8 (K=8, d=2, isotropic), grid25 (K=25) and aniso (K=6, full covariances), float32, with one
shared t and with per-sample t. The target for ring8 shared-t score is >= 1e7 evals/s on 2 cores.
"""
from __future__ import annotations

import argparse
import time

import torch

from odecm.schedules import make_schedule
from toys.gmm import make_preset


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sch = make_schedule("vp")
    g = torch.Generator().manual_seed(0)
    n = args.batch
    print(f"batch={n} threads={args.threads} dtype={args.dtype}")
    for preset in ["ring8", "grid25", "aniso"]:
        gmm = make_preset(preset)
        x = torch.randn(n, gmm.dim, generator=g, dtype=dtype)
        t_shared = torch.tensor(0.3)
        t_per = torch.rand(n, generator=g) * 0.98 + 0.01
        den = gmm.exact_denoiser(sch)
        with torch.no_grad():
            cases = {
                "score, shared t": lambda: gmm.score(x, t_shared, sch),
                "score, per-sample t": lambda: gmm.score(x, t_per, sch),
                "denoiser (x0+eps), shared t": lambda: den(x, t_shared),
                "log_prob_t, shared t": lambda: gmm.log_prob_t(x, t_shared, sch),
            }
            for name, fn in cases.items():
                rate = best_rate(fn, n, args.repeats)
                print(f"{preset:7s} K={gmm.num_components:2d} {gmm.cov_type:9s} {name:28s} {rate / 1e6:8.1f} M evals/s")


if __name__ == "__main__":
    main()
