"""Benchmark the PF-ODE solvers: NFE, wall time and error on batched 2D problems.

    python -m benchmarks.solvers [--schedule edm|vp|ve|vp_cosine|sdxl] [--batch 10000] [--steps 18 50 100]
                                 [--problem gaussian gmm] [--predicts x0 eps] [--threads 1]

Problems (exact denoisers written inline, float64):

* ``gaussian``: data N(m, v I); error against the closed-form flow
  ``y(s') = m + (y(s) - m) sqrt((v + s'^2) / (v + s^2))`` in ``y = x / alpha``, ``s = sigma / alpha``.
* ``gmm``: 8 isotropic modes on the unit circle (std 0.1); error against dopri8 at rtol 1e-10.

``--predicts``: the denoiser returns x0 (eps = (x - alpha x0) / sigma; ``finite_at_zero_noise`` False)
or eps computed directly (finite at sigma = 0). The two differ only in ``heun_vp``'s last corrector
on a grid that ends at the clean point (at t_min for x0, at t_clean for eps, like the paper's UNet).

Continuous schedules: every solver integrates from ``t_max`` to ``t_min`` (Karras grid, rho = 7).
``sdxl``: the paper's setting, SDXL's schedule with the paper's indexing (``timestep_offset=1``) and
the skip grid ``10 n``-style (``T/N`` must divide 1000; default N = 10, 50, 100) from t = 1000 down to
the clean point t = 0 (the gmm reference stops at sigma_tilde = 1e-7 and is rescaled).
NFE = denoiser calls (each call evaluates the whole batch). Not run by CI.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from odecm.denoisers import FunctionDenoiser
from odecm.grids import karras, skip
from odecm.schedules import make_schedule, sdxl_schedule
from odecm.solvers import SOLVERS, solve, solve_adaptive

F64 = torch.float64
MEAN, VAR = torch.tensor([0.5, -0.3], dtype=F64), 0.25


def gaussian_problem(sch, predicts="x0"):
    def x0_hat(x, t, cond=None):
        a, s = sch.alpha(t).reshape(-1, 1), sch.sigma_tilde(t).reshape(-1, 1)
        if predicts == "eps":  # eps = (y - x0) / s = s (y - m) / (v + s^2), finite at s = 0
            return s * (x / a - MEAN) / (VAR + s**2)
        return MEAN + VAR / (VAR + s**2) * (x / a - MEAN)

    def exact(x, t_from, t_to):
        t_from, t_to = torch.tensor(t_from, dtype=F64), torch.tensor(t_to, dtype=F64)
        s0, s1 = sch.sigma_tilde(t_from), sch.sigma_tilde(t_to)
        return sch.alpha(t_to) * (MEAN + (x / sch.alpha(t_from) - MEAN) * torch.sqrt((VAR + s1**2) / (VAR + s0**2)))

    return FunctionDenoiser(x0_hat, sch, predicts=predicts), exact


def gmm_problem(sch, predicts="x0", n_modes=8, radius=1.0, std=0.1):
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
        if predicts == "eps":  # (y - x0) / s = s (y - m) / v, finite at s = 0
            return s * (y - m) / v
        return m + std**2 / v * (y - m)

    den = FunctionDenoiser(x0_hat, sch, predicts=predicts)

    def exact(x, t_from, t_to):
        t_end = t_to
        if float(sch.sigma_tilde(torch.tensor(t_to, dtype=F64))) < 1e-7:  # the adaptive solver needs sigma > 0
            t_end = float(sch.t_from_sigma_tilde(torch.tensor(1e-7, dtype=F64)))
        out = solve_adaptive(den, x, t_from, t_end, method="dopri8", rtol=1e-10, atol=1e-12)[0]
        return out * (sch.alpha(torch.tensor(t_to, dtype=F64)) / sch.alpha(torch.tensor(t_end, dtype=F64)))

    return den, exact


def run(args):
    paper = args.schedule == "sdxl"
    sch = sdxl_schedule(timestep_offset=1) if paper else make_schedule(args.schedule)
    t_max, t_end = sch.t_max, (sch.t_clean if paper else sch.t_min)
    make_grid = (lambda n: skip(sch, n)) if paper else (lambda n: karras(sch, n))  # noqa: E731
    steps = args.steps or ([10, 50, 100] if paper else [18, 50, 100])
    print(f"schedule={args.schedule} t: {t_max} -> {t_end} (s: {float(sch.sigma_tilde(torch.tensor(t_max, dtype=F64))):.3g}"
          f" -> {float(sch.sigma_tilde(torch.tensor(t_end, dtype=F64))):.3g}), grid={'skip' if paper else 'karras'}, "
          f"batch={args.batch}, threads={torch.get_num_threads()}")
    for problem in args.problem:
        for predicts in args.predicts:
            den, exact = (gaussian_problem if problem == "gaussian" else gmm_problem)(sch, predicts)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, 2, generator=g, dtype=F64) * sch.sigma(torch.tensor(t_max, dtype=F64))
            t0 = time.perf_counter()
            ref = exact(x, t_max, t_end)
            print(f"\n## {problem}, denoiser predicts {predicts} (reference in {time.perf_counter() - t0:.2f}s)\n")
            print("| solver | N | NFE | wall s | RMS error | max error |\n|---|---|---|---|---|---|")

            def report(name, n, nfe, wall, out):
                err = (out - ref).norm(dim=-1)
                print(f"| {name} | {n} | {nfe} | {wall:.3f} | {float(err.pow(2).mean().sqrt()):.2e} | {float(err.max()):.2e} |")

            for solver in SOLVERS:
                for n in steps:
                    grid = make_grid(n)
                    t0 = time.perf_counter()
                    res = solve(solver, den, x, grid, n)
                    report(solver, n, res.calls, time.perf_counter() - t0, res.x)
            if paper:
                continue  # the adaptive solvers need sigma(t_to) > 0
            for method, rtol in (("dopri5", 1e-5), ("dopri5", 1e-7), ("dopri8", 1e-7), ("dopri8", 1e-9)):
                t0 = time.perf_counter()
                out, nfe = solve_adaptive(den, x, t_max, t_end, method=method, rtol=rtol, atol=rtol * 1e-2)
                report(f"{method} rtol={rtol:g}", "-", nfe, time.perf_counter() - t0, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", default="edm", choices=["edm", "vp", "ve", "vp_cosine", "sdxl"],
                   help="sdxl: the paper's setting (offset-1 indexing, skip grid down to the clean point)")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="grid sizes N (default 18 50 100; sdxl 10 50 100)")
    p.add_argument("--problem", nargs="+", default=["gaussian", "gmm"], choices=["gaussian", "gmm"])
    p.add_argument("--predicts", nargs="+", default=["x0"], choices=["x0", "eps"],
                   help="denoiser form (eps is finite at sigma = 0: heun_vp's last corrector then runs at t_clean)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives steadier timings on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
