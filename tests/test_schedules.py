"""Noise schedules: derivatives against autograd / finite differences, inverse maps, the forward
SDE's marginal moments, and SDXL's discrete levels against diffusers."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from odecm.schedules import EDM, VE, DiscreteSchedule, VPCosine, VPLinear, make_schedule, sdxl_schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONTINUOUS = {
    "vp": VPLinear(),
    "vp_cosine": VPCosine(),
    "ve": VE(),
    "edm": EDM(),
}


def _interior_times(sch, n=41):
    """float64 times strictly inside [t_min, t_max]."""
    return torch.linspace(sch.t_min, sch.t_max, n, dtype=torch.float64)[1:-1]


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_derivatives_match_autograd(name):
    sch = CONTINUOUS[name]
    t = _interior_times(sch).requires_grad_(True)
    (da,) = torch.autograd.grad((sch.alpha(t) + 0 * t).sum(), t)  # + 0 t: alpha may be constant
    (ds,) = torch.autograd.grad(sch.sigma(t).sum(), t)
    t = t.detach()
    torch.testing.assert_close(sch.d_alpha(t), da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sch.d_sigma(t), ds, rtol=1e-10, atol=1e-12)


def test_discrete_derivatives_match_finite_differences():
    """Inside an interval sigma_tilde is linear in t, so a central difference there is exact up to rounding."""
    for sch in (sdxl_schedule(0), sdxl_schedule(1)):
        t = torch.tensor([0.3, 5.5, 123.25, 500.5, 997.7], dtype=torch.float64) + sch.t_min
        h = 1e-4
        fd_a = (sch.alpha(t + h) - sch.alpha(t - h)) / (2 * h)
        fd_s = (sch.sigma(t + h) - sch.sigma(t - h)) / (2 * h)
        torch.testing.assert_close(sch.d_alpha(t), fd_a, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(sch.d_sigma(t), fd_s, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CONTINUOUS) + ["sdxl0", "sdxl1"])
def test_inverse_maps_round_trip(name):
    sch = CONTINUOUS.get(name) or sdxl_schedule(int(name[-1]))
    if isinstance(sch, DiscreteSchedule):
        t = torch.tensor([0.0, 0.25, 1.0, 7.5, 99.0, 640.3, 998.9], dtype=torch.float64) + sch.t_min
    else:
        t = _interior_times(sch)
    torch.testing.assert_close(sch.t_from_log_snr(sch.log_snr(t)), t, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sch.t_from_sigma_tilde(sch.sigma_tilde(t)), t, rtol=1e-9, atol=1e-9)
    # log_snr is -2 log(sigma / alpha), decreasing in t
    torch.testing.assert_close(sch.log_snr(t), torch.log(sch.alpha(t) ** 2 / sch.sigma(t) ** 2))
    assert bool((sch.log_snr(t).diff() < 0).all())


@pytest.mark.parametrize("name", sorted(CONTINUOUS) + ["sdxl0"])
def test_drift_and_diffusion_satisfy_variance_ode(name):
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (autograd / finite differences)."""
    sch = CONTINUOUS.get(name) or sdxl_schedule(0)
    if isinstance(sch, DiscreteSchedule):
        t = torch.tensor([3.5, 200.5, 800.25], dtype=torch.float64)
        h = 1e-4
        d_var = (sch.sigma(t + h) ** 2 - sch.sigma(t - h) ** 2) / (2 * h)
        d_log_a = (torch.log(sch.alpha(t + h)) - torch.log(sch.alpha(t - h))) / (2 * h)
    else:
        t = _interior_times(sch).requires_grad_(True)
        (d_var,) = torch.autograd.grad((sch.sigma(t) ** 2).sum(), t)
        (d_log_a,) = torch.autograd.grad((torch.log(sch.alpha(t)) + 0 * t).sum(), t)
        t = t.detach()
    torch.testing.assert_close(sch.drift(t), d_log_a, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(d_var, 2 * sch.drift(t) * sch.sigma(t) ** 2 + sch.diffusion2(t), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "ve", "edm"])
def test_forward_sde_moments_integrate_to_alpha_sigma(name):
    """Integrating m' = f m and v' = 2 f v + g^2 from (alpha(t0), sigma(t0)^2) gives (alpha(t), sigma(t)^2)."""
    sch = CONTINUOUS[name]
    t0, t1 = sch.t_min, sch.t_max * 0.9 if name != "edm" else 10.0

    def rhs(t, z):
        tt = torch.tensor(t, dtype=torch.float64)
        f, g2 = float(sch.drift(tt)), float(sch.diffusion2(tt))
        return [f * z[0], 2 * f * z[1] + g2]

    ts = np.linspace(t0, t1, 7)
    z0 = [float(sch.alpha(torch.tensor(t0, dtype=torch.float64))), float(sch.sigma(torch.tensor(t0, dtype=torch.float64))) ** 2]
    sol = solve_ivp(rhs, (t0, t1), z0, t_eval=ts, rtol=1e-10, atol=1e-12, method="DOP853")
    tt = torch.tensor(ts, dtype=torch.float64)
    np.testing.assert_allclose(sol.y[0], sch.alpha(tt).numpy(), rtol=1e-7)
    np.testing.assert_allclose(sol.y[1], (sch.sigma(tt) ** 2).numpy(), rtol=1e-7)


def test_known_closed_forms():
    vp = VPLinear(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    beta = 0.1 + 19.9 * t
    torch.testing.assert_close(vp.drift(t), -0.5 * beta)
    torch.testing.assert_close(vp.diffusion2(t), beta)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    ve = VE(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ve.sigma(torch.tensor([0.0, 1.0])), torch.tensor([0.01, 50.0]))
    edm = EDM()
    torch.testing.assert_close(edm.diffusion2(t), 2 * t)
    torch.testing.assert_close(edm.sigma_tilde(t), t)


def _diffusers_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    return ddpm.alphas_cumprod.double()


def test_discrete_alphas_cumprod_match_diffusers_offset0():
    """timestep_offset=0: timestep k has level alphas_cumprod[k]; clean data at t = -1."""
    ref = _diffusers_alphas_cumprod()
    sch = sdxl_schedule(0)
    assert torch.equal(sch.alphas_cumprod, ref)  # diffusers' own float32 table, cast to float64
    k = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(k) ** 2, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.alpha(k) ** 2, sch.alphas_cumprod, rtol=1e-12, atol=0)
    assert float(sch.sigma(torch.tensor(-1.0, dtype=torch.float64))) == 0.0
    assert sch.t_clean == -1.0 and sch.t_min == 0.0 and sch.t_max == 999.0


def test_discrete_alphas_cumprod_match_diffusers_offset1():
    """timestep_offset=1 (paper): timestep k has level alphas_cumprod[k - 1]; clean data at t = 0."""
    ref = _diffusers_alphas_cumprod()
    sch = sdxl_schedule(1)
    k = torch.arange(1, 1001, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(k) ** 2, ref, rtol=1e-12, atol=0)
    assert float(sch.sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0
    assert float(sch.alpha(torch.tensor(0.0, dtype=torch.float64))) == 1.0
    assert sch.t_clean == 0.0 and sch.t_max == 1000.0


def test_discrete_interpolates_sigma_tilde_linearly():
    sch = sdxl_schedule(0)
    s = sch.sigma_tilde(torch.tensor([10.0, 11.0, 10.25], dtype=torch.float64))
    assert math.isclose(float(s[2]), 0.75 * float(s[0]) + 0.25 * float(s[1]), rel_tol=1e-12)
    # between the clean point and the first timestep, too
    s0 = float(sch.sigma_tilde(torch.tensor(0.0, dtype=torch.float64)))
    assert math.isclose(float(sch.sigma_tilde(torch.tensor(-0.5, dtype=torch.float64))), 0.5 * s0, rel_tol=1e-12)


def test_make_schedule_names_allowed_values():
    assert isinstance(make_schedule("sdxl"), DiscreteSchedule)
    assert isinstance(make_schedule("vp", beta_max=10.0), VPLinear)
    with pytest.raises(ValueError, match="allowed"):
        make_schedule("nope")
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule(beta_schedule="quadratic")


# ----------------------------------------------------------------------------- exact diffusers tables
TABLE_CONFIGS = {
    "linear": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    "scaled_linear": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    "scaled_linear_T500": dict(num_train_timesteps=500, beta_start=0.0005, beta_end=0.015, beta_schedule="scaled_linear"),
    # float64 values that float32 rounds: the cast must happen where diffusers casts
    "trained_betas": dict(num_train_timesteps=7, trained_betas=[1e-4, 3.3333333e-3, 0.0123456789, 0.05, 0.1, 0.3, 0.77]),
}


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("name", sorted(TABLE_CONFIGS))
def test_tables_equal_diffusers_bitwise(name, scheduler):
    """A schedule built from a scheduler config holds exactly diffusers' float32 betas and
    alphas_cumprod (cast to float64), for every beta_schedule and for trained_betas; so does
    ``sdxl.teacher.schedule_from_scheduler_config`` (the SDXL teacher's schedule)."""
    diffusers = pytest.importorskip("diffusers")
    from sdxl.teacher import schedule_from_scheduler_config

    ref = getattr(diffusers, scheduler)(**TABLE_CONFIGS[name])
    assert ref.betas.dtype == torch.float32 and ref.alphas_cumprod.dtype == torch.float32
    config = dict(ref.config)
    for offset in (0, 1):
        for sch in (DiscreteSchedule.from_scheduler_config(config, offset), schedule_from_scheduler_config(config, offset)):
            assert torch.equal(sch.betas, ref.betas.double()), name
            assert torch.equal(sch.alphas_cumprod, ref.alphas_cumprod.double()), name
            assert sch.num_train_timesteps == ref.config.num_train_timesteps and sch.timestep_offset == offset
    if name != "trained_betas":  # the constructor takes the same fields
        kw = {k: v for k, v in TABLE_CONFIGS[name].items()}
        assert torch.equal(DiscreteSchedule(**kw).alphas_cumprod, ref.alphas_cumprod.double())


def test_from_alphas_cumprod_keeps_the_table():
    ac = sdxl_schedule(0).alphas_cumprod
    for offset in (0, 1):
        sch = DiscreteSchedule.from_alphas_cumprod(ac, timestep_offset=offset)
        assert torch.equal(sch.alphas_cumprod, ac) and sch.t_clean == offset - 1 and sch.t_max == offset + 999
        k = torch.arange(1000, dtype=torch.float64)
        torch.testing.assert_close(sch.alpha(k + offset) ** 2, ac, rtol=1e-12, atol=0)
        # betas = 1 - a_k / a_{k-1} recover the float32 betas to float32 rounding of the product
        torch.testing.assert_close(sch.betas, sdxl_schedule(0).betas, rtol=2e-4, atol=0)
        torch.testing.assert_close(torch.cumprod(1 - sch.betas, 0), ac, rtol=1e-12, atol=0)
    float32_table = torch.linspace(0.99, 0.01, 50, dtype=torch.float32)
    assert torch.equal(DiscreteSchedule.from_alphas_cumprod(float32_table).alphas_cumprod, float32_table.double())


@pytest.mark.parametrize("bad,match", [
    (dict(rescale_betas_zero_snr=True, beta_schedule="linear"), "rescale_betas_zero_snr"),
    (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'.*allowed"),
    (dict(trained_betas=[0.1, 1.5]), "trained_betas"),
])
def test_scheduler_config_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        DiscreteSchedule.from_scheduler_config(bad)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule.from_alphas_cumprod(torch.tensor([0.5, 0.7]))
