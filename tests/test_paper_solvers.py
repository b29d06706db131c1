"""The paper's VP Euler / Heun (``euler_vp``, ``heun_vp``).

1. Exact reproduction of the paper's ``EulerSolver`` / ``HeunSolver`` (layer6ai-labs/direct-cms,
   ``train_direct_cm.py``) on SDXL's schedule with the paper's indexing: a float64 numpy
   re-derivation of those classes and of the paper's masked Direct CD loop, from diffusers'
   ``DDPMScheduler`` float32 tables, against odecm's one-step solvers and ``solve``.
2. Convergence orders and Direct CD endpoint errors against the closed-form PF-ODE of Gaussian data.
3. The clean-end rule for denoisers that cannot be evaluated at zero noise.
"""
import functools

import numpy as np
import pytest
import torch

from odecm.denoisers import CFGDenoiser, Denoiser, EpsDenoiser, FunctionDenoiser, NFECounter, broadcast_time
from odecm.grids import karras, skip, uniform
from odecm.schedules import EDM, VE, VPLinear, sdxl_schedule
from odecm.solvers import SOLVERS, get_solver, solve, vp_coefficients

F64 = torch.float64
T, N, W = 1000, 100, 9.0
pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- 1. the paper's code
@functools.lru_cache(maxsize=1)
def paper_tables():
    """``betas * T`` and ``sqrt(1 - alphas_cumprod)`` from diffusers' float32 tables, cast to float64."""
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    return ddpm.betas.double().numpy() * T, np.sqrt(1.0 - ddpm.alphas_cumprod.double().numpy())


class PaperSolvers:
    """float64 re-derivation of the paper's EulerSolver + HeunSolver tables and steps (N = 100)."""

    def __init__(self):
        betas, sigmas = paper_tables()
        ratio = T // N
        self.start_timesteps = (np.arange(1, N + 1) * ratio)[::-1].copy()  # 1000, 990, ..., 10
        self.next_timesteps = (np.arange(N) * ratio)[::-1].copy()  # 990, ..., 10, 0
        self.euler_betas = betas[self.start_timesteps - 1]
        self.euler_sigmas = sigmas[self.start_timesteps - 1]
        nxt = self.next_timesteps - 1
        self.heun_betas = np.asarray(betas[nxt[:-1]].tolist() + [betas[0]])
        self.heun_sigmas = np.asarray(sigmas[nxt[:-1]].tolist() + [sigmas[0]])

    def euler(self, x, eps, i):
        dt = float(self.next_timesteps[i] - self.start_timesteps[i]) / T
        beta, sigma = self.euler_betas[i], self.euler_sigmas[i]
        d = -0.5 * beta * x + 0.5 * (1 / sigma) * beta * eps
        return d, x + dt * d

    def heun(self, x, d, x_pred, eps_pred, i):
        dt = float(self.next_timesteps[i] - self.start_timesteps[i]) / T
        beta, sigma = self.heun_betas[i], self.heun_sigmas[i]
        d2 = -0.5 * beta * x_pred + 0.5 * (1 / sigma) * beta * eps_pred
        return x + 0.5 * dt * (d + d2)


def eps_model(x, t, cond):
    """A smooth analytic eps(x, t, cond): x (B, 4, 3, 3), t (B,), cond (B, 5); float64 throughout."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
    c = torch.tanh(cond.sum(-1)).reshape(-1, 1, 1, 1)
    return (torch.tanh(0.3 * x + 0.001 * t) + 0.1 * torch.sin(0.7 * x - 0.002 * t)
            + 0.3 * c * torch.cos(x + 0.0005 * t) + 0.05 * c)


def paper_eps(x, timestep, cond, guided):
    """The paper's teacher call: cond and zeroed-uncond UNet calls, Imagen CFG with w = 9."""
    t = torch.full((x.shape[0],), float(timestep), dtype=F64)
    x = torch.as_tensor(x)
    eps_c = eps_model(x, t, cond)
    if not guided:
        return eps_c.numpy()
    eps_u = eps_model(x, t, torch.zeros_like(cond))
    return (eps_u + W * (eps_c - eps_u)).numpy()


def paper_direct_cd(x, index, cond, solver, guided):
    """The paper's Direct CD loop: from the batch's smallest timestep index (largest timestep) to the
    end, masking samples whose own start timestep is lower (``index`` in 0..N-1 per sample)."""
    ps = PaperSolvers()
    x = x.numpy().copy()
    own_start = ps.start_timesteps[index]
    for i in range(int(index.min()), N):
        no_step = ps.start_timesteps[i] > own_start
        eps = paper_eps(x, ps.start_timesteps[i], cond, guided)
        d, x_next = ps.euler(x, eps, i)
        x_next[no_step] = x[no_step]
        if solver == "heun_vp":
            eps2 = paper_eps(x_next, ps.next_timesteps[i], cond, guided)
            x_next = ps.heun(x, d, x_next, eps2, i)
            x_next[no_step] = x[no_step]
        x = x_next
    return torch.from_numpy(x)


def odecm_teacher(guided):
    den = EpsDenoiser(eps_model, sdxl_schedule(timestep_offset=1))
    return CFGDenoiser(den, W, convention="imagen") if guided else den


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 3, 3, generator=g, dtype=F64), torch.randn(B, 5, generator=g, dtype=F64)


def test_paper_grid_is_the_skip_grid():
    grid = skip(sdxl_schedule(1), N)
    ps = PaperSolvers()
    assert torch.equal(grid[1:].flip(0), torch.from_numpy(ps.start_timesteps).double())
    assert torch.equal(grid[:-1].flip(0), torch.from_numpy(ps.next_timesteps).double())


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg9"])
@pytest.mark.parametrize("solver", ["euler_vp", "heun_vp"])
@pytest.mark.parametrize("n", [1, 2, 50, 99, 100])
def test_one_step_reproduces_paper(solver, n, guided):
    x, cond = _batch()
    grid = skip(sdxl_schedule(1), N)
    den = NFECounter(odecm_teacher(guided))
    out = get_solver(solver).step(den, x, grid[n], grid[n - 1], cond)
    ps, i = PaperSolvers(), N - n  # the paper's timestep_index of grid point n
    d, ref = ps.euler(x.numpy(), paper_eps(x.numpy(), ps.start_timesteps[i], cond, guided), i)
    if solver == "heun_vp":  # the corrector calls the UNet at t_n (timestep 0 on the last interval)
        ref = ps.heun(x.numpy(), d, ref, paper_eps(ref, ps.next_timesteps[i], cond, guided), i)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=1e-10, atol=1e-10)
    assert den.calls == (2 if solver == "heun_vp" else 1)
    assert float((out - x).abs().max()) > 1e-3  # a real move


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg9"])
@pytest.mark.parametrize("mask_mode", ["full", "subset"])
@pytest.mark.parametrize("solver", ["euler_vp", "heun_vp"])
def test_masked_direct_cd_solve_reproduces_paper(solver, mask_mode, guided):
    x, cond = _batch(B=6, seed=1)
    n = torch.tensor([100, 1, 37, 2, 99, 50])  # per-sample start indices (grid[n] = 10 n)
    grid = skip(sdxl_schedule(1), N)
    res = solve(solver, odecm_teacher(guided), x, grid, n, cond=cond, mask_mode=mask_mode)
    ref = paper_direct_cd(x, (N - n).numpy(), cond, solver, guided)
    torch.testing.assert_close(res.x, ref, rtol=1e-10, atol=1e-10)
    per_step = 2 if solver == "heun_vp" else 1
    cfg = 2 if guided else 1  # CFG doubles the batch inside one call
    assert res.steps == 100
    assert res.evals == per_step * (6 * 100 if mask_mode == "full" else int(n.sum()))
    assert res.evals * cfg > 0 and float((res.x - x).abs().max()) > 0.1


def test_paper_batch_from_smaller_start_only():
    """A batch whose largest start is below N (the paper starts from the batch's largest t_n)."""
    x, cond = _batch(B=4, seed=2)
    n = torch.tensor([3, 7, 7, 1])
    grid = skip(sdxl_schedule(1), N)
    res = solve("heun_vp", odecm_teacher(True), x, grid, n, cond=cond, mask_mode="full")
    torch.testing.assert_close(res.x, paper_direct_cd(x, (N - n).numpy(), cond, "heun_vp", True),
                               rtol=1e-10, atol=1e-10)
    assert res.steps == 7


def test_discrete_coefficients_read_the_tables():
    """Integers read the tables exactly (index t - offset); the clean point reads index 0; between
    integers the tables are interpolated linearly in t."""
    betas, sigmas = paper_tables()
    for offset in (0, 1):
        sch = sdxl_schedule(offset)
        k = torch.tensor([0, 1, 9, 499, 999], dtype=F64)
        a, b = vp_coefficients(sch, k + offset)
        assert torch.equal(a, torch.from_numpy(-0.5 * betas[k.long()]))
        assert torch.equal(b, torch.from_numpy(0.5 * (1 / sigmas[k.long()]) * betas[k.long()]))
        a0, b0 = vp_coefficients(sch, torch.tensor([sch.t_clean], dtype=F64))
        assert float(a0) == -0.5 * betas[0] and float(b0) == 0.5 * (1 / sigmas[0]) * betas[0]
        mid = torch.tensor([offset + 10.25], dtype=F64)
        beta_mid = 0.75 * betas[10] + 0.25 * betas[11]
        sigma_mid = 0.75 * sigmas[10] + 0.25 * sigmas[11]
        a_mid, b_mid = vp_coefficients(sch, mid)
        assert float(a_mid) == pytest.approx(-0.5 * beta_mid, rel=1e-14)
        assert float(b_mid) == pytest.approx(0.5 * beta_mid / sigma_mid, rel=1e-14)


# ----------------------------------------------------------------------------- 2. Gaussian closed form
MEAN = torch.tensor([0.7, -0.4], dtype=F64)
VAR = 0.3


class GaussianEps(Denoiser):
    """Exact denoiser of N(m, v I) in eps form, ``eps = (y - m) s / (v + s^2)`` (finite at s = 0)."""

    def forward(self, x, t, cond=None):
        a = broadcast_time(self.schedule.alpha(t), x)
        s = broadcast_time(self.schedule.sigma_tilde(t), x)
        return self.from_eps(x, t, (x / a - MEAN) * s / (VAR + s**2))


class GaussianX0(Denoiser):
    """The same denoiser predicting x0: ``eps = (x - alpha x0) / sigma`` is 0/0 at s = 0."""

    finite_at_zero_noise = False

    def forward(self, x, t, cond=None):
        a = broadcast_time(self.schedule.alpha(t), x)
        s = broadcast_time(self.schedule.sigma_tilde(t), x)
        return self.from_x0(x, t, MEAN + VAR / (VAR + s**2) * (x / a - MEAN))


def exact_flow(sch, x, t_from, t_to):
    """y(s') = m + (y(s) - m) sqrt((v + s'^2) / (v + s^2)), per-sample times."""
    s0, s1 = broadcast_time(sch.sigma_tilde(t_from), x), broadcast_time(sch.sigma_tilde(t_to), x)
    a0, a1 = broadcast_time(sch.alpha(t_from), x), broadcast_time(sch.alpha(t_to), x)
    return a1 * (MEAN + (x / a0 - MEAN) * torch.sqrt((VAR + s1**2) / (VAR + s0**2)))


@pytest.mark.parametrize("solver,order", [("euler_vp", 1.0), ("heun_vp", 2.0)])
@pytest.mark.parametrize("sched", ["vp", "ve"])
def test_vp_solvers_converge_at_their_order(solver, order, sched):
    """Uniform grid in t from t_max to t_min; log-log slope of the max error over N = 64..256."""
    sch = {"vp": VPLinear(), "ve": VE()}[sched]
    den = GaussianEps(sch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=F64) * sch.sigma(torch.tensor(sch.t_max, dtype=F64))
    ref = exact_flow(sch, x, torch.tensor(sch.t_max, dtype=F64), torch.tensor(sch.t_min, dtype=F64))
    ns = [64, 128, 256]
    errs = [float((solve(solver, den, x, uniform(sch, n), n).x - ref).abs().max()) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    print(f"{sched} {solver}: errors {['%.2e' % e for e in errs]} slope {slope:.3f}")
    assert order - 0.1 <= slope <= order + 0.15, (slope, errs)


def _direct_cd_errors(sch, grid, den, solvers, B=512, seed=0):
    """RMS endpoint error of Direct CD solves (per-sample n ~ U{1..N}) against the closed form at t_0."""
    N_ = grid.numel() - 1
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, N_ + 1, (B,), generator=g)
    x0 = MEAN + VAR**0.5 * torch.randn(B, 2, generator=g, dtype=F64)
    t = grid[n]
    noise = torch.randn(B, 2, generator=g, dtype=F64)
    x_tn = broadcast_time(sch.alpha(t), x0) * x0 + broadcast_time(sch.sigma(t), x0) * noise
    ref = exact_flow(sch, x_tn, t, grid[0].expand(B))
    return {s: float(((solve(s, den, x_tn, grid, n).x - ref) ** 2).sum(-1).mean().sqrt()) for s in solvers}


@pytest.mark.parametrize("num_steps", [20, 100])
def test_direct_cd_endpoint_errors_differ_between_families(num_steps):
    """Continuous VP, uniform grid from the clean point t = 0 to t = 1, 512 samples. Measured (RMS,
    N = 20 / 100): ddim 9.2e-2 / 1.9e-2, euler_vp 3.0e-2 / 6.4e-3, heun_vp 7.4e-3 / 8.5e-4 (eps form,
    last corrector at t = 0) and 4.0e-3 / 9.8e-5 (x0 form, last corrector at t_min)."""
    sch = VPLinear()
    grid = uniform(sch, num_steps, t_start=0.0)
    names = ["ddim", "euler", "euler_vp", "heun_vp"]
    err = _direct_cd_errors(sch, grid, GaussianEps(sch), names)
    err_x0 = _direct_cd_errors(sch, grid, GaussianX0(sch), names)
    fmt = lambda d: {k: f"{v:.2e}" for k, v in d.items()}  # noqa: E731
    print(f"N={num_steps}", fmt(err), "x0 form:", fmt(err_x0))
    assert err["euler"] == pytest.approx(err["ddim"], rel=1e-9)  # EDM Euler is DDIM
    assert err["ddim"] > 2.5 * err["euler_vp"]
    assert err["euler_vp"] > 3.0 * err["heun_vp"]
    assert err_x0["heun_vp"] < err["heun_vp"]  # the t_min rule is the consistent corrector
    for k in ("ddim", "euler_vp"):  # single-eval solvers never touch the clean point
        assert err_x0[k] == pytest.approx(err[k], rel=1e-9)


def test_vp_solvers_equal_edm_solvers_on_edm_schedule():
    """With alpha = 1, sigma = t (EDM) the PF-ODE in (x, t) is dx/dt = eps: euler_vp is EDM's Euler
    and heun_vp EDM's Heun (away from the clean point)."""
    sch = EDM()
    den = FunctionDenoiser(lambda x, t, c: torch.tanh(x) / (1 + 0.1 * t.reshape(-1, 1)), sch)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * 10
    grid = karras(sch, 12)
    for vp, edm in (("euler_vp", "euler"), ("heun_vp", "heun")):
        torch.testing.assert_close(solve(vp, den, x, grid, 12).x, solve(edm, den, x, grid, 12).x,
                                   rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- 3. the clean end
def test_heun_vp_clean_end_uses_t_min_for_x0_denoisers():
    """An x0-predicting denoiser (finite_at_zero_noise False): the last corrector evaluates at t_min,
    with the clean-end coefficients (those of t_min); the result is finite and matches a hand step."""
    sch = VPLinear()
    den = GaussianX0(sch)
    assert not den.finite_at_zero_noise and not CFGDenoiser(den, 2.0, "imagen").finite_at_zero_noise
    assert not NFECounter(den).finite_at_zero_noise
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t0, t1 = torch.zeros(5, dtype=F64), torch.full((5,), 0.05, dtype=F64)
    out = get_solver("heun_vp").step(den, x, t1, t0)
    assert bool(torch.isfinite(out).all())
    # by hand: dx/dt = -beta/2 x + beta/(2 sigma) eps
    beta = lambda t: 0.1 + 19.9 * t  # noqa: E731
    sig = lambda t: float(sch.sigma(torch.tensor(t, dtype=F64)))  # noqa: E731
    d = -0.5 * beta(0.05) * x + 0.5 * beta(0.05) / sig(0.05) * den(x, t1).eps
    x_pred = x - 0.05 * d
    t_min = torch.full((5,), sch.t_min, dtype=F64)
    d2 = -0.5 * beta(sch.t_min) * x_pred + 0.5 * beta(sch.t_min) / sig(sch.t_min) * den(x_pred, t_min).eps
    torch.testing.assert_close(out, x - 0.05 * 0.5 * (d + d2), rtol=1e-12, atol=1e-12)
    # the same denoiser wrongly declared finite at zero noise: a clear error, not silent NaNs
    liar = GaussianX0(sch)
    liar.finite_at_zero_noise = True
    with pytest.raises(FloatingPointError, match="finite_at_zero_noise"):
        get_solver("heun_vp").step(liar, x, t1, t0)


def test_heun_vp_clean_end_calls_eps_denoisers_at_t_clean():
    """An eps-predicting denoiser is called at the clean point itself (the paper's UNet at timestep 0)."""
    seen = []

    def eps_fn(x, t, cond=None):
        seen.append(t.clone())
        return torch.sin(x)

    sch = sdxl_schedule(1)
    den = EpsDenoiser(eps_fn, sch)
    x = torch.randn(3, 2, dtype=F64)
    get_solver("heun_vp").step(den, x, 10.0, 0.0)
    assert torch.equal(seen[1], torch.zeros(3, dtype=F64))
    x0_den = FunctionDenoiser(lambda x, t, c: torch.sin(x), sch, predicts="x0")
    calls = []
    counting = FunctionDenoiser(lambda x, t, c: calls.append(t.clone()) or torch.sin(x), sch, predicts="x0")
    assert not x0_den.finite_at_zero_noise
    out = get_solver("heun_vp").step(counting, x, 10.0, 0.0)
    assert torch.equal(calls[1], torch.ones(3, dtype=F64)) and bool(torch.isfinite(out).all())  # t_min = 1


def test_registry_metadata():
    assert sorted(SOLVERS) == ["ddim", "euler", "euler_vp", "heun", "heun_vp"]
    meta = {k: (c.order, c.evals_per_step, c.equivalent_to) for k, c in SOLVERS.items()}
    assert meta == {"ddim": (1, 1, None), "euler": (1, 1, "ddim"), "heun": (2, 2, None),
                    "euler_vp": (1, 1, None), "heun_vp": (2, 2, None)}
    for name, cls in SOLVERS.items():
        assert cls.name == name and cls.__doc__
        assert cls.equivalent_to is None or cls.equivalent_to in SOLVERS
