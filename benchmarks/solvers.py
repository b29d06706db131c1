"""Benchmark the PF-ODE solvers: NFE, wall time and error on batched 2D problems.

    python -m benchmarks.solvers [--schedule edm|vp|ve] [--batch 10000] [--steps 18 50 100] [--problem gaussian gmm]
                                 [--threads 1]

Problems (exact denoisers written inline, float64):

* ``gaussian``: data N(m, v I); error against the closed-form flow
  ``y(s') = m + (y(s) - m) sqrt((v + s'^2) / (v + s^2))`` in ``y = x / alpha``, ``s = sigma / alpha``.
* ``gmm``: 8 isotropic modes on the unit circle (std 0.1); error against dopri8 at rtol 1e-10.

Each solver integrates from ``t_max`` to ``t_min`` (Karras grid, rho = 7, for the fixed-step solvers).
NFE = denoiser calls (each call evaluates the whole batch). Not run by CI.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from odecm.denoisers import FunctionDenoiser
from odecm.grids import karras
from odecm.schedules import make_schedule
from odecm.solvers import solve, solve_adaptive

F64 = torch.float64
MEAN, VAR = torch.tensor([0.5, -0.3], dtype=F64), 0.25


def gaussian_problem(sch):
    def x0_hat(x, t, cond=None):
        a, s = sch.alpha(t).reshape(-1, 1), sch.sigma_tilde(t).reshape(-1, 1)
        return MEAN + VAR / (VAR + s**2) * (x / a - MEAN)

    def exact(x, t_from, t_to):
        t_from, t_to = torch.tensor(t_from, dtype=F64), torch.tensor(t_to, dtype=F64)
        s0, s1 = sch.sigma_tilde(t_from), sch.sigma_tilde(t_to)
        return sch.alpha(t_to) * (MEAN + (x / sch.alpha(t_from) - MEAN) * torch.sqrt((VAR + s1**2) / (VAR + s0**2)))

    return FunctionDenoiser(x0_hat, sch), exact


def gmm_problem(sch, n_modes=8, radius=1.0, std=0.1):
    ang = 2 * math.pi * torch.arange(n_modes, dtype=F64) / n_modes
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], -1)  # (K, 2)

    def x0_hat(x, t, cond=None):
        # in y = x / alpha: y ~ sum_k N(m_k, (std^2 + s^2) I); E[x0 | y] = sum_k r_k (m_k + std^2/(std^2+s^2) (y - m_k))
        a, s = sch.alpha(t).reshape(-1, 1), sch.sigma_tilde(t).reshape(-1, 1)
        y = x / a
        v = std**2 + s**2
        logits = -((y[:, None, :] - means) ** 2).sum(-1) / (2 * v)
        r = torch.softmax(logits, dim=-1)
        m = r @ means
        return m + std**2 / v * (y - m)

    den = FunctionDenoiser(x0_hat, sch)

    def exact(x, t_from, t_to):
        return solve_adaptive(den, x, t_from, t_to, method="dopri8", rtol=1e-10, atol=1e-12)[0]

    return den, exact


def run(args):
    sch = make_schedule(args.schedule)
    t_max, t_min = sch.t_max, sch.t_min
    print(f"schedule={args.schedule} t: {t_max} -> {t_min} (s: {float(sch.sigma_tilde(torch.tensor(t_max, dtype=F64))):.3g}"
          f" -> {float(sch.sigma_tilde(torch.tensor(t_min, dtype=F64))):.3g}), batch={args.batch}, threads={torch.get_num_threads()}")
    for problem in args.problem:
        den, exact = (gaussian_problem if problem == "gaussian" else gmm_problem)(sch)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 2, generator=g, dtype=F64) * sch.sigma(torch.tensor(t_max, dtype=F64))
        t0 = time.perf_counter()
        ref = exact(x, t_max, t_min)
        print(f"\n## {problem} (reference in {time.perf_counter() - t0:.2f}s)\n")
        print("| solver | N | NFE | wall s | RMS error | max error |\n|---|---|---|---|---|---|")

        def report(name, n, nfe, wall, out):
            err = (out - ref).norm(dim=-1)
            print(f"| {name} | {n} | {nfe} | {wall:.3f} | {float(err.pow(2).mean().sqrt()):.2e} | {float(err.max()):.2e} |")

        for solver in ("ddim", "euler", "heun"):
            for n in args.steps:
                grid = karras(sch, n)
                t0 = time.perf_counter()
                res = solve(solver, den, x, grid, n)
                report(solver, n, res.calls, time.perf_counter() - t0, res.x)
        for method, rtol in (("dopri5", 1e-5), ("dopri5", 1e-7), ("dopri8", 1e-7), ("dopri8", 1e-9)):
            t0 = time.perf_counter()
            out, nfe = solve_adaptive(den, x, t_max, t_min, method=method, rtol=rtol, atol=rtol * 1e-2)
            report(f"{method} rtol={rtol:g}", "-", nfe, time.perf_counter() - t0, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", default="edm", choices=["edm", "vp", "ve", "vp_cosine"])
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs="+", default=[18, 50, 100])
    p.add_argument("--problem", nargs="+", default=["gaussian", "gmm"], choices=["gaussian", "gmm"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives steadier timings on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
