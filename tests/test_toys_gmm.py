"""Exact Gaussian-mixture world: score = autograd of log-density, Tweedie, sampling, ODE."""
import math

import pytest
import torch
from scipy import stats

from odecm.schedules import make_schedule
from toys.gmm import GaussianMixture, make_preset, PRESETS

SCHEDULE_TIMES = {
    "vp": [0.02, 0.3, 0.9],
    "ve": [0.01, 0.3, 1.0],
    "edm": [0.01, 0.5, 10.0],
    "sdxl": [0, 150, 600, 999],
}


def _brute_log_prob(g: GaussianMixture, x, a, s):
    comp = torch.distributions.MultivariateNormal(a * g.means, a * a * g.covs + s * s * torch.eye(g.dim, dtype=torch.float64))
    return torch.logsumexp(comp.log_prob(x[:, None, :]) + torch.log(g.weights), -1)


def _coef(sch, t):
    tt = torch.tensor(float(t), dtype=torch.float64)
    return float(sch.alpha(tt)), float(sch.sigma(tt))


def _diag_variant():
    g = make_preset("ring8")
    var = torch.stack([torch.full((8,), 0.02), torch.linspace(0.005, 0.03, 8, dtype=torch.float64)], -1)
    return GaussianMixture(g.weights, g.means, var)


@pytest.mark.parametrize("sched", list(SCHEDULE_TIMES))
@pytest.mark.parametrize("preset", ["ring8", "aniso", "diag"])
def test_score_matches_autograd_and_log_prob_matches_brute_force(sched, preset):
    g = _diag_variant() if preset == "diag" else make_preset(preset)
    assert g.cov_type == {"ring8": "isotropic", "aniso": "full", "diag": "diagonal"}[preset]
    sch = make_schedule(sched)
    gen = torch.Generator().manual_seed(1)
    for t in SCHEDULE_TIMES[sched]:
        a, s = _coef(sch, t)
        x, _ = g.sample_pt(96, t, sch, gen, dtype=torch.float64)
        x = torch.cat([x, 1.5 * torch.randn(32, 2, generator=gen, dtype=torch.float64)])
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(g.log_prob_t(xr, t, sch).sum(), xr)
        score = g.score(x, t, sch)
        scale = score.abs().max().clamp(min=1.0)
        assert (score - grad).abs().max() <= 1e-10 * scale, (sched, t)
        lp = g.log_prob_t(x, t, sch)
        assert torch.allclose(lp, _brute_log_prob(g, x, a, s), atol=1e-9, rtol=1e-11)
        # per-sample times (mixed) agree with one-time-at-a-time evaluation
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
        tt[::3] = float(SCHEDULE_TIMES[sched][1])
        mixed = g.score(x, tt, sch)
        for tv in (float(t), float(SCHEDULE_TIMES[sched][1])):
            m = tt == tv
            assert torch.allclose(mixed[m], g.score(x[m], tv, sch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sched", list(SCHEDULE_TIMES))
def test_tweedie_and_eps_relations(sched):
    sch = make_schedule(sched)
    gen = torch.Generator().manual_seed(2)
    for preset in ["twoscale", "aniso"]:
        g = make_preset(preset)
        den = g.exact_denoiser(sch)
        for t in SCHEDULE_TIMES[sched]:
            a, s = _coef(sch, t)
            x, _ = g.sample_pt(128, t, sch, gen, dtype=torch.float64)
            pred = den(x, t)
            score = g.score(x, t, sch)
            assert torch.allclose(pred.x0, (x + s * s * score) / a, rtol=1e-9, atol=1e-9)
            assert torch.allclose(pred.eps, -s * score, rtol=1e-12, atol=1e-12)
            assert torch.allclose(pred.x0, g.posterior_mean_x0(x, t, sch), rtol=1e-12, atol=1e-12)
            assert torch.allclose(a * pred.x0 + s * pred.eps, x, atol=1e-9)


def test_clean_point_and_t_none():
    g = make_preset("aniso")
    x, _ = g.sample_p0(100, torch.Generator().manual_seed(0), dtype=torch.float64)
    sdxl = make_schedule("sdxl")
    assert torch.allclose(g.log_prob(x), g.log_prob_t(x, sdxl.t_clean, sdxl), atol=1e-12)
    assert torch.allclose(g.log_prob(x), _brute_log_prob(g, x, 1.0, 0.0), atol=1e-10)


def test_blocked_evaluation_equals_single_block():
    g = make_preset("grid25")
    sch = make_schedule("vp")
    x = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    full = g.score(x, t, sch), g.posterior_mean_x0(x, 0.4, sch), g.log_prob_t(x, 0.4, sch)
    g.block_elements = 4000  # 160 rows per block
    blocked = g.score(x, t, sch), g.posterior_mean_x0(x, 0.4, sch), g.log_prob_t(x, 0.4, sch)
    for u, v in zip(full, blocked):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)


def test_sample_pt_matches_exact_cdf_ks():
    g = make_preset("ring8")
    sch = make_schedule("vp")
    u = torch.tensor([0.6, 0.8], dtype=torch.float64)
    x, labels = g.sample_pt(20000, 0.3, sch, torch.Generator().manual_seed(123), dtype=torch.float64)
    proj = (x @ u).numpy()
    ok = stats.kstest(proj, lambda v: g.cdf_1d(torch.as_tensor(v), u, 0.3, sch).numpy())
    assert ok.pvalue > 1e-3 and ok.statistic < 0.015
    wrong = stats.kstest(proj, lambda v: g.cdf_1d(torch.as_tensor(v), u, 0.45, sch).numpy())
    assert wrong.pvalue < 1e-6  # the test can tell a different noise level apart
    assert labels.shape == (20000,) and int(labels.min()) >= 0 and int(labels.max()) <= 7


def test_sample_p0_moments_and_labels():
    g = make_preset("imbalanced")
    x, labels = g.sample_p0(100_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(x.mean(0), g.mean(), atol=0.01)
    assert torch.allclose(torch.cov(x.T), g.covariance(), atol=0.01)
    freq = torch.bincount(labels, minlength=8).double() / labels.numel()
    assert torch.allclose(freq, g.weights, atol=0.005)
    # each sample sits near its own component's mean (std 0.1)
    assert float((x - g.means[labels]).norm(dim=-1).mean()) < 0.2


def test_dim64_works():
    sch = make_schedule("edm")
    gen = torch.Generator().manual_seed(0)
    for g in [make_preset("ring8", dim=64, embed="rotate"), make_preset("aniso", dim=64), make_preset("random", dim=64)]:
        assert g.dim == 64
        x, _ = g.sample_pt(64, 0.5, sch, gen, dtype=torch.float64)
        assert x.shape == (64, 64)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(g.log_prob_t(xr, 0.5, sch).sum(), xr)
        assert torch.allclose(g.score(x, 0.5, sch), grad, rtol=1e-10, atol=1e-10)
        a, s = _coef(sch, 0.5)
        assert torch.allclose(g.log_prob_t(x, 0.5, sch), _brute_log_prob(g, x, a, s), atol=1e-8)
    assert make_preset("ring8", dim=64, embed="rotate").cov_type == "isotropic"
    assert make_preset("aniso", dim=64).cov_type == "full"


def test_exact_ode_single_gaussian_closed_form():
    # one component N(m, c I): in y = x / alpha, s = sigma / alpha the PF-ODE flow is
    # y(s) = m + (y(S) - m) sqrt(c + s^2) / sqrt(c + S^2)
    m = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    c = 0.04
    g = GaussianMixture([1.0], m, [c])
    for name, t_from, t_to in [("ve", 1.0, 0.01), ("vp", 0.9, 0.05), ("sdxl", 999, 10)]:
        sch = make_schedule(name)
        xT = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        out = g.exact_ode_solution(xT, t_from, t_to, sch, rtol=1e-8, atol=1e-8)
        aS, sS = _coef(sch, t_from)
        a1, s1 = _coef(sch, t_to)
        S, s_ = sS / aS, s1 / a1
        y = m + (xT / aS - m) * math.sqrt(c + s_**2) / math.sqrt(c + S**2)
        assert torch.allclose(out, a1 * y, atol=1e-6), name
    # to the clean point of VP (t = 0): y(0) = m + (y_T - m) sqrt(c) / sqrt(c + S^2)
    sch = make_schedule("vp")
    out = g.exact_ode_solution(xT, 0.9, 0.0, sch, rtol=1e-8, atol=1e-8)
    aS, sS = _coef(sch, 0.9)
    y0 = m + (xT / aS - m) * math.sqrt(c) / math.sqrt(c + (sS / aS) ** 2)
    assert torch.allclose(out, y0, atol=1e-6)


def test_presets_scales_and_errors():
    for name in PRESETS:
        g = make_preset(name)
        assert 0.55 < g.data_std() < 0.85, name
        assert torch.allclose(g.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert make_preset("grid25").num_components == 25
    assert make_preset("ring8", radius=2.0).data_std() > 1.2
    with pytest.raises(ValueError, match="allowed"):
        make_preset("nope")
    with pytest.raises(ValueError, match="allowed"):
        make_preset("ring8", bogus=1)
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0]]])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [0.0])


def test_float32_path_close_to_float64():
    g = make_preset("ring8")
    sch = make_schedule("sdxl")
    x, _ = g.sample_pt(4096, 300, sch, torch.Generator().manual_seed(0), dtype=torch.float64)
    s64 = g.score(x, 300, sch)
    s32 = g.score(x.float(), 300, sch)
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s64, rtol=1e-4, atol=1e-4 * float(s64.abs().max()))


# --- the empirical distribution: K point masses (the image world's exact teacher) ----------------

def _empirical(K=300, d=16, seed=0):
    pts = torch.randn(K, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return GaussianMixture.empirical(pts), pts


@pytest.mark.parametrize("t", [1, 20, 300, 1000])
def test_empirical_score_matches_autograd_and_brute_force(t):
    g, pts = _empirical()
    assert g.is_empirical and g.cov_type == "isotropic"
    sch = make_schedule("sdxl", timestep_offset=1)
    a, s = _coef(sch, t)
    gen = torch.Generator().manual_seed(3)
    x = a * pts[:64] + s * torch.randn(64, 16, generator=gen, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob_t(xr, t, sch).sum(), xr)
    score = g.score(x, t, sch)
    assert (score - grad).abs().max() <= 1e-9 * score.abs().max().clamp(min=1.0)
    comp = torch.distributions.MultivariateNormal(a * pts, s * s * torch.eye(16, dtype=torch.float64))
    brute = torch.logsumexp(comp.log_prob(x[:, None, :]) - math.log(pts.shape[0]), -1)
    assert torch.allclose(g.log_prob_t(x, t, sch), brute, atol=1e-8, rtol=1e-10)
    # Tweedie and the posterior mean as a responsibility-weighted average of the points
    pred = g.exact_denoiser(sch)(x, t)
    assert torch.allclose(pred.x0, (x + s * s * score) / a, atol=1e-9 * max(1.0, s * s * float(score.abs().max())))
    r = torch.softmax(comp.log_prob(x[:, None, :]), -1)
    assert torch.allclose(pred.x0, r @ pts, atol=1e-9)
    # per-sample times and row blocks agree with the shared-time single block
    tt = torch.full((64,), float(t), dtype=torch.float64)
    tt[::2] = 500.0
    mixed = g.score(x, tt, sch)
    assert torch.allclose(mixed[1::2], score[1::2], rtol=1e-10, atol=1e-10)
    assert torch.allclose(mixed[::2], g.score(x[::2], 500.0, sch), rtol=1e-10, atol=1e-10)
    g.block_elements = 300 * 4  # 256 rows (the minimum) per block
    big = torch.cat([x] * 5)
    assert torch.allclose(g.score(big, t, sch), torch.cat([score] * 5), rtol=1e-12, atol=1e-12)


def test_empirical_moments_sampling_and_errors():
    g, pts = _empirical(K=50, d=4)
    assert torch.allclose(g.mean(), pts.mean(0), atol=1e-12)
    assert torch.allclose(g.covariance(), torch.cov(pts.T, correction=0), atol=1e-12)
    x, labels = g.sample_p0(10, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(x, pts[labels])
    sch = make_schedule("sdxl", timestep_offset=1)
    with pytest.raises(ValueError, match="sigma = 0"):
        g.score(x, 0, sch)
    with pytest.raises(ValueError, match="allow_zero_variance"):
        GaussianMixture([1.0, 1.0], pts[:2], [0.0, 0.0])


def test_empirical_exact_ode_returns_the_training_point_from_its_own_noisy_version():
    g, pts = _empirical(K=200, d=16, seed=1)
    sch = make_schedule("sdxl", timestep_offset=1)
    t = 30.0
    a, s = _coef(sch, t)
    x_t = a * pts[:20] + s * torch.randn(20, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = g.exact_ode_solution(x_t, t, 0.0, sch, rtol=1e-8, atol=1e-8)
    assert (out - pts[:20]).abs().max() < 1e-10
    # from pure noise the endpoint is one of the points (the exact ODE of the empirical data memorises)
    x_T = torch.randn(20, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * _coef(sch, 1000)[1]
    end = g.exact_ode_solution(x_T, 1000.0, 0.0, sch, rtol=1e-7, atol=1e-7)
    assert float((end[:, None] - pts[None]).norm(dim=-1).min(1).values.max()) < 1e-9
    # ... and it matches a fixed-step Heun solve of the same ODE (Karras grid down to t = 2), then snapped
    from odecm import grids
    from odecm.solvers import solve

    fine = grids.karras(sch, 100, t_start=2.0, t_end=1000.0)
    mid = solve("heun", g.exact_denoiser(sch), x_T, fine, fine.numel() - 1).x
    ref_mid = g.exact_ode_solution(x_T, 1000.0, 2.0, sch, rtol=1e-8, atol=1e-8)
    assert (mid - ref_mid).abs().max() < 5e-4  # Heun converges at order ~2: 2.2e-3, 8.2e-4, 2.6e-4, 7.3e-5 at 25..200 steps
    assert torch.allclose(g.exact_denoiser(sch)(mid, 2.0).x0, end, atol=1e-9)
