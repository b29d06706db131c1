"""odecm.metrics: Frechet distance against closed forms and a direct scipy computation; ODE error."""
import numpy as np
import pytest
import scipy.linalg
import torch

from odecm.metrics import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    ode_error,
    per_sample_sq_error,
)

F64 = torch.float64


def test_frechet_closed_form_commuting_covariances():
    """Diagonal covariances: FD = ||mu1 - mu2||^2 + sum_i (sqrt(c1_i) - sqrt(c2_i))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([1.0, -1.0, 2.5], dtype=F64)
    c1, c2 = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    expected = 1 + 4 + 0.25 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, torch.diag(c1), mu2, torch.diag(c2)) == pytest.approx(expected, rel=1e-12)
    # identical Gaussians: zero
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    assert frechet_distance(mu1[:2], cov, mu1[:2], cov) == pytest.approx(0.0, abs=1e-12)


def test_frechet_scaled_covariance():
    """C2 = k^2 C1 commutes with C1: FD = ||dmu||^2 + (1 - k)^2 tr C1."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=F64)
    c1 = a @ a.T + 0.1 * torch.eye(5, dtype=F64)
    mu = torch.zeros(5, dtype=F64)
    assert frechet_distance(mu, c1, mu + 0.5, 9.0 * c1) == pytest.approx(5 * 0.25 + 4.0 * float(torch.trace(c1)), rel=1e-10)


def _scipy_fd(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_scipy_sqrtm_on_random_features(d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d))
    f1 = rng.normal(size=(500, d)) @ mix
    f2 = rng.normal(size=(400, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.2
    expected = _scipy_fd(f1, f2)
    got = frechet_distance_features(torch.from_numpy(f1), torch.from_numpy(f2.astype(np.float32)))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert got > 0


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 3, 2))
    mu, cov = feature_stats(torch.from_numpy(f))
    flat = f.reshape(50, -1)
    np.testing.assert_allclose(mu.numpy(), flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(flat, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(torch.zeros(1, 3))


def test_ode_error_value():
    a = torch.zeros(2, 3, 2)
    b = torch.ones(2, 3, 2)
    b[1] *= 3.0
    # sample 0: mean of 1^2 = 1; sample 1: mean of 3^2 = 9; E = 5
    torch.testing.assert_close(per_sample_sq_error(a, b), torch.tensor([1.0, 9.0], dtype=F64))
    assert ode_error(a, b) == pytest.approx(5.0)
    assert ode_error(b, b) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        ode_error(a, b[:1])


def test_lowrank_frechet_path_matches_covariance_form():
    """With fewer samples than dimensions frechet_distance_features uses an n1 x n2 SVD; it must
    equal the d x d covariance formula (and scipy)."""
    from odecm.metrics import feature_stats

    g = torch.Generator().manual_seed(5)
    f1 = torch.randn(7, 40, generator=g, dtype=torch.float64) * 2 + 1
    f2 = torch.randn(9, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64) * 0.3
    dense = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert frechet_distance_features(f1, f2) == pytest.approx(dense, rel=1e-7)
    assert frechet_distance_features(f1, f2) == pytest.approx(_scipy_fd(f1.numpy(), f2.numpy()), rel=1e-6)
    assert abs(frechet_distance_features(f1, f1)) < 1e-9
