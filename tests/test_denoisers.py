"""Denoiser adapters and classifier-free guidance against hand-computed values."""
import pytest
import torch

from odecm.denoisers import (
    CFGDenoiser,
    EpsDenoiser,
    FunctionDenoiser,
    NFECounter,
    ScoreDenoiser,
    VDenoiser,
    X0Denoiser,
    batch_time,
    imagen_from_lcm,
    lcm_from_imagen,
)
from odecm.schedules import EDM, VPCosine, VPLinear, sdxl_schedule

F64 = torch.float64
MEAN, VAR = 0.4, 0.5


# --- adapters on a Gaussian: x0 ~ N(MEAN, VAR I), x_t ~ N(alpha MEAN, alpha^2 VAR + sigma^2) ---------------

def _gaussian_quantities(sch, x, t):
    a = sch.alpha(t).reshape(-1, 1)
    sig = sch.sigma(t).reshape(-1, 1)
    var_t = a**2 * VAR + sig**2
    score = -(x - a * MEAN) / var_t  # grad log N(x; alpha m, var_t)
    x0 = MEAN + a * VAR / var_t * (x - a * MEAN)  # posterior mean E[x0 | x_t]
    eps = (x - a * x0) / sig
    v = a * eps - sig * x0
    return dict(x0=x0, eps=eps, v=v, score=score)


def _model(sch, kind):
    return lambda x, t, cond=None: _gaussian_quantities(sch, x, t)[kind]


@pytest.mark.parametrize("sched", [VPLinear(), VPCosine(), EDM(), sdxl_schedule()], ids=["vp", "vp_cos", "edm", "sdxl"])
def test_adapters_agree_on_gaussian(sched):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=F64) * 2
    lo, hi = sched.t_min, sched.t_max
    t = lo + (hi - lo) * torch.rand(7, generator=g, dtype=F64)
    truth = _gaussian_quantities(sched, x, t)
    # the true eps is Tweedie's: eps = -sigma score
    torch.testing.assert_close(truth["eps"], -sched.sigma(t).reshape(-1, 1) * truth["score"])
    for cls, kind in [(EpsDenoiser, "eps"), (X0Denoiser, "x0"), (VDenoiser, "v"), (ScoreDenoiser, "score")]:
        pred = cls(_model(sched, kind), sched)(x, t)
        torch.testing.assert_close(pred.x0, truth["x0"], rtol=1e-10, atol=1e-10, msg=f"{cls.__name__} x0")
        torch.testing.assert_close(pred.eps, truth["eps"], rtol=1e-10, atol=1e-10, msg=f"{cls.__name__} eps")
        # both parameterisations describe the same point: x = alpha x0 + sigma eps
        recon = sched.alpha(t).reshape(-1, 1) * pred.x0 + sched.sigma(t).reshape(-1, 1) * pred.eps
        torch.testing.assert_close(recon, x, rtol=1e-10, atol=1e-10)
    fd = FunctionDenoiser(_model(sched, "eps"), sched, predicts="eps")(x, t)
    torch.testing.assert_close(fd.x0, truth["x0"], rtol=1e-10, atol=1e-10)


def test_scalar_time_is_broadcast_in_state_precision():
    x = torch.zeros(4, 2, dtype=F64)
    t = batch_time(0.1, x)
    assert t.shape == (4,) and t.dtype == F64 and float(t[0]) == 0.1
    assert batch_time(3, torch.zeros(2, 1)).dtype == torch.float32
    assert batch_time(torch.tensor([1, 2]), x).dtype == F64


# --- CFG -----------------------------------------------------------------------------------------------

def _cond_eps(x, t, cond):
    """An eps model whose output depends on (x, t, cond) in a way easy to recompute by hand."""
    return 0.3 * x + 0.01 * t.reshape(-1, 1) + torch.sin(cond["emb"]) + cond["pooled"].sum(-1, keepdim=True)


def _setup():
    sch = VPLinear()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, generator=g, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    cond = {"emb": torch.randn(3, 2, generator=g, dtype=F64), "pooled": torch.randn(3, 4, generator=g, dtype=F64)}
    return sch, x, t, cond


def test_cfg_conventions_against_hand_computation():
    sch, x, t, cond = _setup()
    inner = EpsDenoiser(_cond_eps, sch)
    eps_c = _cond_eps(x, t, cond)
    eps_u = _cond_eps(x, t, {k: torch.zeros_like(v) for k, v in cond.items()})  # paper: zeroed embeddings
    a, s = sch.alpha(t).reshape(-1, 1), sch.sigma(t).reshape(-1, 1)
    for w in (0.0, 2.5, 9.0):
        lcm = CFGDenoiser(inner, w, "lcm")(x, t, cond)
        imagen = CFGDenoiser(inner, w, "imagen")(x, t, cond)
        expected_lcm = eps_c + w * (eps_c - eps_u)
        expected_imagen = eps_u + w * (eps_c - eps_u)
        torch.testing.assert_close(lcm.eps, expected_lcm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(imagen.eps, expected_imagen, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(imagen.x0, (x - s * expected_imagen) / a, rtol=1e-12, atol=1e-12)
    # imagen w = lcm w + 1
    torch.testing.assert_close(CFGDenoiser(inner, 8.0, "lcm")(x, t, cond).eps,
                               CFGDenoiser(inner, 9.0, "imagen")(x, t, cond).eps, rtol=1e-12, atol=1e-12)
    assert imagen_from_lcm(8.0) == 9.0 and lcm_from_imagen(9.0) == 8.0
    # no guidance: imagen w = 1 and lcm w = 0 equal the conditional model
    torch.testing.assert_close(CFGDenoiser(inner, 1.0, "imagen")(x, t, cond).eps, eps_c)
    torch.testing.assert_close(CFGDenoiser(inner, 0.0, "lcm")(x, t, cond).eps, eps_c)
    with pytest.raises(ValueError, match="convention"):
        CFGDenoiser(inner, 1.0, "original")


def test_cfg_makes_one_doubled_batch_call():
    sch, x, t, cond = _setup()
    counter = NFECounter(EpsDenoiser(_cond_eps, sch))
    CFGDenoiser(counter, 9.0, "imagen")(x, t, cond)
    assert counter.calls == 1 and counter.evals == 2 * x.shape[0]
    counter.reset()
    CFGDenoiser(counter, 1.0, "imagen")(x, t, cond)  # no guidance: a plain call
    assert counter.calls == 1 and counter.evals == x.shape[0]


def test_cfg_custom_uncond_structure_and_callable():
    sch, x, t, cond = _setup()
    inner = EpsDenoiser(_cond_eps, sch)
    null = {"emb": torch.full((1, 2), 0.5, dtype=F64), "pooled": torch.ones(1, 4, dtype=F64)}
    null_b = {k: v.expand(3, *v.shape[1:]) for k, v in null.items()}
    eps_c, eps_u = _cond_eps(x, t, cond), _cond_eps(x, t, null_b)
    expected = eps_u + 3.0 * (eps_c - eps_u)
    torch.testing.assert_close(CFGDenoiser(inner, 3.0, "imagen", uncond=null_b)(x, t, cond).eps, expected)
    torch.testing.assert_close(CFGDenoiser(inner, 3.0, "imagen", uncond=lambda c: null_b)(x, t, cond).eps, expected)
    # a batch-1 structure (e.g. one null-prompt embedding dict) is expanded to the batch
    torch.testing.assert_close(CFGDenoiser(inner, 3.0, "imagen", uncond=null)(x, t, cond).eps, expected)


def test_cfg_per_sample_guidance_scale_matches_scalar_runs():
    """A (B,) tensor of scales gives, per sample, what the scalar CFG wrapper gives."""
    import torch
    from odecm import schedules
    from odecm.denoisers import CFGDenoiser, EpsDenoiser

    sch = schedules.sdxl_schedule()
    inner = EpsDenoiser(lambda x, t, c: torch.tanh(x + c), sch)
    x = torch.randn(3, 2, dtype=torch.float64)
    cond = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64)
    scales = torch.tensor([1.0, 3.0, 9.0], dtype=torch.float64)
    for conv in ("imagen", "lcm"):
        batched = CFGDenoiser(inner, scales, conv)(x, t, cond).eps
        for i in range(3):
            single = CFGDenoiser(inner, float(scales[i]), conv)(x[i:i + 1], t[i:i + 1], cond[i:i + 1]).eps
            assert torch.allclose(batched[i:i + 1], single, atol=1e-12)


def test_finite_at_zero_noise_flags_and_values():
    """The flag says whether a denoiser can be called at the clean point (sigma = 0), and it is true:
    flagged denoisers return finite eps there, unflagged x0 / score forms do not."""
    sch = sdxl_schedule(1)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t0 = torch.zeros(3, dtype=F64)  # the clean point of the paper's indexing
    net = lambda x, t, c=None: torch.tanh(x)  # noqa: E731
    flagged = {EpsDenoiser(net, sch): True, VDenoiser(net, sch): True, X0Denoiser(net, sch): False,
               ScoreDenoiser(net, sch): False, FunctionDenoiser(net, sch, predicts="eps"): True,
               FunctionDenoiser(net, sch, predicts="x0"): False}
    for den, finite in flagged.items():
        assert den.finite_at_zero_noise is finite, type(den).__name__
        assert CFGDenoiser(den, 3.0, "imagen").finite_at_zero_noise is finite
        assert NFECounter(den).finite_at_zero_noise is finite
        if finite:
            assert bool(torch.isfinite(den(x, t0).eps).all()), type(den).__name__
    assert not bool(torch.isfinite(X0Denoiser(lambda x, t, c=None: 0.5 * x, sch)(x, t0).eps).all())


def test_toy_denoisers_declare_zero_noise_behaviour():
    pytest.importorskip("toys")
    from toys.gmm import make_preset
    from toys.networks import MLPDenoiser
    from toys.scores import LearnedDenoiser

    assert MLPDenoiser.finite_at_zero_noise is False and LearnedDenoiser.finite_at_zero_noise is False
    sch = sdxl_schedule(1)
    exact = make_preset("ring8", dtype=F64).exact_denoiser(sch)
    # computable at sigma = 0 (eps = 0, x0 = x), but flagged False: the paper's UNet called at timestep 0
    # still sees the noise level alphas_cumprod[0], so heun_vp evaluates the exact teacher at t_min there
    assert exact.finite_at_zero_noise is False
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    pred = exact(x, torch.zeros(4, dtype=F64))
    assert bool(torch.isfinite(pred.eps).all()) and torch.equal(pred.x0, x)
