"""Teacher cost of one Direct CD iteration under the two index-drawing schemes.

Measures, over many iterations with a cheap analytic teacher, the sequential solver depth
(``steps``: batched teacher steps, what the paper's batch-max scheme pays in wall time), the batched
denoiser calls and the sample evaluations, with odecm's ``solve`` in ``subset`` and ``full`` mask
modes, and prints them next to the closed-form expectations of ``expected_direct_cd_cost``.

    python -m benchmarks.direct_cd_cost --num-steps 100 --batch 16 --iters 300
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gaussian_problem import GaussianDenoiser  # noqa: E402

from odecm import grids, objectives as O, schedules  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--solver", default="ddim", choices=["ddim", "euler", "heun"])
    args = ap.parse_args()
    sch = schedules.sdxl_schedule()
    grid = grids.skip(sch, args.num_steps)
    teacher = GaussianDenoiser(sch, torch.zeros(2, dtype=torch.float64), 0.25)
    g = torch.Generator().manual_seed(0)
    rows = []
    for scheme in ("per_sample", "shared"):
        for mask_mode in ("full", "subset"):
            provider = O.DirectCDTarget(teacher, args.solver, grid, mask_mode=mask_mode)
            steps = calls = evals = 0
            for _ in range(args.iters):
                n = O.draw_indices(args.batch, args.num_steps, scheme, g)
                x = torch.randn(args.batch, 2, generator=g, dtype=torch.float64)
                out = provider(x, n)
                steps, calls, evals = steps + out.steps, calls + out.calls, evals + out.evals
            it = args.iters
            rows.append((scheme, mask_mode, steps / it, calls / it, evals / it, evals / it / args.batch))
    exp = O.expected_direct_cd_cost(args.num_steps, args.batch)
    print(f"Direct CD teacher cost per iteration, N={args.num_steps}, B={args.batch}, solver={args.solver}, "
          f"{args.iters} iterations")
    print("| scheme | mask | solver steps (depth) | teacher calls | sample evals | evals / sample |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.2f} |")
    print(f"expected depth: per-sample {exp['per_sample_depth']:.2f} (N B/(B+1) = {exp['approx_NB_over_B1']:.2f}), "
          f"shared {exp['shared_depth']:.2f}; expected evals per sample {exp['sample_evals_per_sample']:.2f} "
          f"(x{2 if args.solver == 'heun' else 1} calls per step for {args.solver})")


if __name__ == "__main__":
    main()
