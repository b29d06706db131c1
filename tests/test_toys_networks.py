"""toys.networks: MLP students, time embeddings, denoiser wrapper and the consistency boundary."""
from __future__ import annotations

import math

import pytest
import torch

from odecm.grids import skip
from odecm.schedules import VPLinear, sdxl_schedule
from toys.networks import MLP, NetworkConfig, consistency_student, make_student, time_features, time_input

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only add sync cost



@pytest.mark.parametrize("boundary", ["lcm", "edm"])
@pytest.mark.parametrize("predicts", ["x0", "eps"])
def test_boundary_condition_is_exact(boundary, predicts):
    """f(x, t_min) == x bitwise, and f != x away from the boundary."""
    sch = sdxl_schedule() if boundary == "lcm" else VPLinear()
    f = consistency_student(make_student(NetworkConfig(predicts=predicts), sch, seed=0), boundary)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t_min = f.boundary.t_min
    with torch.no_grad():
        assert torch.equal(f(x, torch.full((64,), t_min)), x)
        t_mid = 500.0 if boundary == "lcm" else 0.5
        assert (f(x, torch.full((64,), t_mid)) - x).abs().max() > 1e-2


def test_lcm_boundary_scalings_follow_formula():
    """c_skip = sd^2 / ((10 t)^2 + sd^2) at t = 9 against the hand formula: f = c_skip x + c_out x0_hat."""
    sch = sdxl_schedule()
    den = make_student(NetworkConfig(), sch, seed=3)
    f = consistency_student(den, "lcm")
    x = torch.randn(8, 2, dtype=torch.float64)
    f = f.double()
    t = torch.full((8,), 9.0, dtype=torch.float64)
    with torch.no_grad():
        x0 = den(x, t).x0
        c_skip = 0.25 / (90.0**2 + 0.25)
        c_out = 90.0 / math.sqrt(90.0**2 + 0.25)
        torch.testing.assert_close(f(x, t), c_skip * x + c_out * x0, rtol=1e-12, atol=1e-12)


def test_denoiser_parameterisations_are_consistent():
    """x = alpha x0_hat + sigma eps_hat for both predicts modes; x0 mode returns the net output."""
    sch = sdxl_schedule()
    for predicts in ("x0", "eps"):
        den = make_student(NetworkConfig(predicts=predicts), sch, seed=0).double()
        x = torch.randn(32, 2, dtype=torch.float64)
        t = torch.linspace(0, 999, 32, dtype=torch.float64)
        p = den(x, t)
        a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
        torch.testing.assert_close(a * p.x0 + s * p.eps, x, rtol=1e-10, atol=1e-10)
    cfg = NetworkConfig(input_scaling=False)
    den = make_student(cfg, sch, seed=0)
    x, t = torch.randn(4, 2), torch.full((4,), 100.0)
    torch.testing.assert_close(den(x, t).x0, den.net(x, time_input(cfg, sch, t)))


def test_time_inputs_and_features():
    sch = sdxl_schedule()
    grid = skip(sch, 100)
    u = time_input(NetworkConfig(time_input="t"), sch, grid)
    assert float(u[0]) == pytest.approx(1 / 1000) and float(u[-1]) == pytest.approx(1.0)  # (t + 1) / 1000
    v = time_input(NetworkConfig(time_input="log_sigma"), sch, grid)
    torch.testing.assert_close(v.double(), torch.log(sch.sigma_tilde(grid)) / 4, rtol=1e-6, atol=1e-6)
    feats = time_features(torch.tensor([[0.25]]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(feats, torch.tensor([[0.25, 1.0, 0.0, 0.0, -1.0]]), atol=1e-6, rtol=0)


def test_init_is_seeded_and_matches_pytorch_rule():
    cfg = NetworkConfig(width=256, time_embedding="fourier")
    a, b = MLP(cfg, torch.Generator().manual_seed(0)), MLP(cfg, torch.Generator().manual_seed(0))
    c = MLP(cfg, torch.Generator().manual_seed(1))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[1].weight, c.layers[1].weight)
    assert not torch.equal(a.freqs, c.freqs)
    w = a.layers[1].weight  # U(-1/16, 1/16): std = bound / sqrt(3)
    w = w.detach()
    assert float(w.abs().max()) <= 1 / 16
    assert float(w.std()) == pytest.approx(1 / 16 / math.sqrt(3), rel=0.02)


def test_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="wdth"):
        NetworkConfig(wdth=3)
    with pytest.raises(Exception, match="time_input"):
        NetworkConfig(time_input="sigma")
