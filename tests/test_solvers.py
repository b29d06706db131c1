"""PF-ODE solvers against the closed-form flow of Gaussian data, and the batching contract of
``solve`` and ``Solver.step``.

Gaussian data N(m, v I): with ``y = x / alpha`` and ``s = sigma / alpha`` the exact denoiser is
``x0_hat = m + v / (v + s^2) (y - m)`` under any schedule and the PF-ODE flow is

    y(s') = m + (y(s) - m) sqrt((v + s'^2) / (v + s^2)).
"""
import numpy as np
import pytest
import torch

from odecm.denoisers import FunctionDenoiser, NFECounter
from odecm.grids import karras
from odecm.schedules import EDM, VE, VPLinear, sdxl_schedule
from odecm.solvers import SOLVERS, get_solver, solve, solve_adaptive

F64 = torch.float64
MEAN = torch.tensor([0.7, -0.4], dtype=F64)
VAR = 0.3
SCHEDULES = {"vp": VPLinear(), "ve": VE(), "edm": EDM()}
EXPECTED_ORDER = {"euler": 1.0, "ddim": 1.0, "heun": 2.0}  # the VP family: tests/test_paper_solvers.py
EDM_FAMILY = ("ddim", "euler", "heun")


def gaussian_denoiser(sch, mean=MEAN, var=VAR):
    def x0_hat(x, t, cond=None):
        a = sch.alpha(t).reshape(-1, 1)
        s = sch.sigma_tilde(t).reshape(-1, 1)
        return mean + var / (var + s**2) * (x / a - mean)

    return FunctionDenoiser(x0_hat, sch, predicts="x0")


def exact_flow(sch, x, t_from, t_to, mean=MEAN, var=VAR):
    t_from, t_to = torch.tensor(float(t_from), dtype=F64), torch.tensor(float(t_to), dtype=F64)
    s0, s1 = sch.sigma_tilde(t_from), sch.sigma_tilde(t_to)
    y = x / sch.alpha(t_from)
    return sch.alpha(t_to) * (mean + (y - mean) * torch.sqrt((var + s1**2) / (var + s0**2)))


def start_noise(sch, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sig = sch.sigma(torch.tensor(sch.t_max, dtype=F64))
    return torch.randn(n, 2, generator=g, dtype=F64) * sig


@pytest.mark.parametrize("sched", sorted(SCHEDULES))
@pytest.mark.parametrize("solver", sorted(EXPECTED_ORDER))
def test_fixed_step_solvers_converge_at_their_order(sched, solver):
    """Karras grid (rho = 7) from t_max to t_min; log-log slope of the max error over N = 16..128."""
    sch = SCHEDULES[sched]
    den = gaussian_denoiser(sch)
    x = start_noise(sch)
    ref = exact_flow(sch, x, sch.t_max, sch.t_min)
    ns = [16, 32, 64, 128]
    errs = [float((solve(solver, den, x, karras(sch, n), n).x - ref).abs().max()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    print(f"convergence {sched} {solver}: errors {['%.2e' % e for e in errs]} slope {slope:.3f}")
    order = EXPECTED_ORDER[solver]
    assert order - 0.15 <= slope <= order + 0.3, (slope, errs)
    assert errs[-1] < (5e-2 if order == 1 else 2e-3)


@pytest.mark.parametrize("sched", sorted(SCHEDULES))
def test_adaptive_solver_matches_closed_form(sched):
    sch = SCHEDULES[sched]
    den = gaussian_denoiser(sch)
    x = start_noise(sch, n=16)
    ref = exact_flow(sch, x, sch.t_max, sch.t_min)
    out, nfe = solve_adaptive(den, x, sch.t_max, sch.t_min)  # float64, rtol 1e-7, atol 1e-9
    assert out.dtype == F64 and nfe > 10
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # and a partial interval, not ending at t_min
    t_mid = sch.t_from_sigma_tilde(torch.tensor(1.0, dtype=F64))
    out_mid, _ = solve_adaptive(den, x, sch.t_max, float(t_mid))
    torch.testing.assert_close(out_mid, exact_flow(sch, x, sch.t_max, float(t_mid)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sched", ["vp", "edm", "sdxl"])
def test_ddim_exact_for_point_data(sched):
    """Data = a single point m: x0_hat = m exactly, and DDIM follows y(s') = m + (y - m) s'/s with any step."""
    sch = SCHEDULES.get(sched) or sdxl_schedule()
    point = torch.tensor([1.5, -2.0], dtype=F64)
    den = gaussian_denoiser(sch, mean=point, var=0.0)
    x = start_noise(sch, n=8, seed=3)
    t_end = sch.t_clean if sch.t_clean is not None else sch.t_min
    t_lo = sch.t_min
    grid = torch.tensor([t_end, t_lo + 0.3 * (sch.t_max - t_lo), sch.t_max * 0.9, sch.t_max], dtype=F64)
    res = solve("ddim", den, x, grid, 3, return_trajectory=True)
    for k, state in zip([3, 2, 1, 0], res.trajectory):
        torch.testing.assert_close(state, exact_flow(sch, x, sch.t_max, float(grid[k]), mean=point, var=0.0),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.x, point.expand(8, 2), rtol=0, atol=1e-12)  # the clean end is the point


def nonlinear_denoiser(sch):
    """A smooth non-Gaussian x0 predictor that also reads a per-sample conditioning vector."""

    def x0_hat(x, t, cond):
        a = sch.alpha(t).reshape(-1, 1)
        s = sch.sigma_tilde(t).reshape(-1, 1)
        return torch.tanh(x / a) * (1.0 + 0.2 * cond) / (1.0 + 0.1 * s) + 0.05 * torch.sin(3 * x)

    return FunctionDenoiser(x0_hat, sch)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solve_from_mixed_start_indices(solver):
    sch = VPLinear()
    den = nonlinear_denoiser(sch)
    grid = karras(sch, 10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    cond = torch.randn(6, 2, generator=g, dtype=F64)
    start = torch.tensor([3, 0, 10, 7, 1, 3])
    res = solve(solver, den, x, grid, start, cond=cond)
    for b in range(6):
        alone = solve(solver, den, x[b:b + 1], grid, int(start[b]), cond=cond[b:b + 1]).x
        torch.testing.assert_close(res.x[b:b + 1], alone, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(res.x[1], x[1], rtol=0, atol=0)  # start 0: untouched
    assert res.steps == 10
    if solver == "ddim":
        assert res.evals == int(start.sum()) and res.calls == 10
    full = solve(solver, den, x, grid, start, cond=cond, mask_mode="full")
    torch.testing.assert_close(full.x, res.x, rtol=1e-13, atol=1e-13)
    assert full.steps == 10
    if solver == "ddim":
        assert full.evals == 6 * 10


def test_solve_counts_heun_evaluations():
    """Heun: two evaluations per step except a final step that ends at sigma = 0 (plain Euler)."""
    sch = VPLinear()
    den = NFECounter(nonlinear_denoiser(sch))
    grid = torch.cat([torch.zeros(1, dtype=F64), karras(sch, 4)[1:]])  # grid[0] = clean point
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = solve("heun", den, x, grid, torch.tensor([4, 2, 1]), cond=torch.zeros(3, 2, dtype=F64))
    # interior steps: (3 + 1 + 0) samples x 2 evals; final steps to sigma 0: 3 samples x 1 eval
    assert res.evals == 2 * (3 + 1) + 3
    assert den.evals == res.evals


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_step_with_per_sample_times(solver):
    """A batch with different (t_from, t_to) per sample equals a loop over samples; some end at sigma 0
    (``nonlinear_denoiser`` predicts x0, so ``heun_vp`` evaluates its last corrector at t_min there)."""
    sch = VPLinear()
    den = nonlinear_denoiser(sch)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    cond = torch.randn(5, 2, generator=g, dtype=F64)
    t_from = torch.tensor([0.9, 0.5, 0.2, 0.05, 0.7], dtype=F64)
    t_to = torch.tensor([0.8, 0.0, 0.1, 0.0, 0.3], dtype=F64)  # samples 1 and 3 end at clean data
    step = get_solver(solver).step
    batched = step(den, x, t_from, t_to, cond)
    for b in range(5):
        alone = step(den, x[b:b + 1], t_from[b], t_to[b], cond[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-13, atol=1e-13)
    assert bool(torch.isfinite(batched).all())
    if solver in EDM_FAMILY:  # ending at sigma = 0, the EDM-family solvers return x0_hat (Heun falls back to Euler)
        x0 = den(x, t_from, cond).x0
        torch.testing.assert_close(batched[[1, 3]], x0[[1, 3]], rtol=1e-12, atol=1e-12)
    counted = NFECounter(den)
    step(counted, x, t_from, t_to, cond)
    if solver == "heun":
        assert counted.calls == 2 and counted.evals == 5 + 3  # corrector only where sigma(t_to) > 0
    if solver == "heun_vp":
        assert counted.calls == 2 and counted.evals == 5 + 5  # the paper's corrector runs on every interval


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solve_to_per_sample_end_indices(solver):
    """Per-sample (start, end): each sample equals solving it alone over its own window."""
    sch = VPLinear()
    den = nonlinear_denoiser(sch)
    grid = karras(sch, 8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 2, generator=g, dtype=F64)
    cond = torch.randn(5, 2, generator=g, dtype=F64)
    start, end = torch.tensor([8, 5, 3, 6, 2]), torch.tensor([6, 0, 3, 2, 1])
    for mask_mode in ("subset", "full"):
        res = solve(solver, den, x, grid, start, cond=cond, end_index=end, mask_mode=mask_mode)
        assert res.steps == 8
        for b in range(5):
            alone = solve(solver, den, x[b:b + 1], grid, int(start[b]), cond=cond[b:b + 1], end_index=int(end[b])).x
            torch.testing.assert_close(res.x[b:b + 1], alone, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(res.x[2], x[2], rtol=0, atol=0)  # start == end: untouched
    if solver == "ddim":
        assert solve(solver, den, x, grid, start, cond=cond, end_index=end).evals == int((start - end).sum())
    with pytest.raises(ValueError, match="end_index <= start_index"):
        solve(solver, den, x, grid, start, cond=cond, end_index=start + 1)


def test_edm_euler_is_ddim():
    """EDM's Euler equals DDIM in exact arithmetic, and the registry says so."""
    assert SOLVERS["euler"].equivalent_to == "ddim"
    sch = VPLinear()
    den = nonlinear_denoiser(sch)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    cond = torch.zeros(6, 2, dtype=F64)
    grid = karras(sch, 7)
    torch.testing.assert_close(solve("euler", den, x, grid, 7, cond=cond).x, solve("ddim", den, x, grid, 7, cond=cond).x,
                               rtol=1e-12, atol=1e-12)


def test_heun_step_is_trapezoid_in_scaled_coordinates():
    """Hand-written EDM Heun step in (y, s) for one sample."""
    sch = EDM()
    den = nonlinear_denoiser(sch)
    x = torch.tensor([[0.8, -1.3]], dtype=F64)
    c = torch.tensor([[0.1, 0.2]], dtype=F64)
    s0, s1 = 2.0, 1.2
    d0 = (x - den(x, s0, c).x0) / s0
    x_pred = x + (s1 - s0) * d0
    d1 = (x_pred - den(x_pred, s1, c).x0) / s1
    expected = x + (s1 - s0) * 0.5 * (d0 + d1)
    torch.testing.assert_close(get_solver("heun").step(den, x, s0, s1, c), expected, rtol=1e-14, atol=1e-14)


def test_get_solver_rejects_unknown_names():
    with pytest.raises(ValueError, match="allowed"):
        get_solver("rk4")
    with pytest.raises(ValueError, match="mask_mode"):
        solve("ddim", gaussian_denoiser(EDM()), torch.zeros(2, 2, dtype=F64), karras(EDM(), 3), 3, mask_mode="bad")
