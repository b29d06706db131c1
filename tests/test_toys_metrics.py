"""toys.metrics: exact values on small problems, closed forms, the finite-sample floor, and monotone
response to a shifted sample set."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import ncx2

from toys.gmm import GaussianMixture, make_preset
from odecm.schedules import EDM
from toys.metrics import (
    HIGHER_IS_BETTER,
    MMD_BANDWIDTHS,
    MODE_MASS,
    covariance_spectrum,
    finite_sample_floor,
    mmd2_unbiased,
    mode_radius,
    mode_statistics,
    negative_log_likelihood,
    per_sample_quality,
    prdc,
    quality_table,
    sample_quality,
    sliced_wasserstein2,
    spectrum_ratio,
    total_variance_ratio,
    wasserstein2,
)

F64 = torch.float64


def _randn(n, d=2, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) + shift


def test_w2_equals_optimal_assignment_on_equal_sets():
    """Uniform weights, equal sizes: the optimal plan is a permutation (Birkhoff), so W2^2 = min-cost matching / n."""
    x, y = _randn(40, seed=1), _randn(40, seed=2, shift=torch.tensor([0.5, -0.3], dtype=F64))
    cost = torch.cdist(x, y).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    assert wasserstein2(x, y) == pytest.approx(math.sqrt(cost[rows, cols].mean()), rel=1e-9)


def test_w2_unequal_sizes_and_translation():
    """Translating every point of one set by v moves W2^2 by |v|^2 + 2 v.(mean difference); a set against
    itself is 0."""
    x, y = _randn(30, seed=3), _randn(45, seed=4)
    v = torch.tensor([3.0, 1.0], dtype=F64)
    w = wasserstein2(x, y)
    expected_sq = w**2 + float(v @ v) + 2 * float(v @ (x.mean(0) - y.mean(0)))
    assert wasserstein2(x + v, y) ** 2 == pytest.approx(expected_sq, rel=1e-8)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-9)


def test_w2_and_sliced_w2_against_gaussian_closed_form():
    """N(0, I) vs N(mu, I) in 2D: W2 = |mu|; sliced W2 = sqrt(E_u (u.mu)^2) = |mu| / sqrt(2)."""
    mu = torch.tensor([2.0, 0.0], dtype=F64)
    x, y = _randn(1000, seed=5), _randn(1000, seed=6, shift=mu)
    assert wasserstein2(x, y) == pytest.approx(2.0, abs=0.1)
    assert sliced_wasserstein2(x, y, num_projections=512) == pytest.approx(2.0 / math.sqrt(2.0), abs=0.06)


def test_sliced_w2_is_exact_in_1d_and_for_unequal_sizes():
    # 1D, equal sizes: W2^2 = mean of squared differences of the sorted samples (every direction is +-1)
    a, b = torch.tensor([[0.0], [1.0], [5.0]], dtype=F64), torch.tensor([[2.0], [-1.0], [3.0]], dtype=F64)
    assert sliced_wasserstein2(a, b) == pytest.approx(math.sqrt((1 + 1 + 4) / 3), rel=1e-12)
    # 1D, sizes 2 and 3: quantile functions on [0, 1/3, 1/2, 2/3, 1] -> hand computation
    u = torch.tensor([[0.0], [3.0]], dtype=F64)
    v = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    # q in (0,1/3]: 0 vs 0; (1/3,1/2]: 0 vs 1; (1/2,2/3]: 3 vs 1; (2/3,1]: 3 vs 2
    expected = (1 / 6) * 1 + (1 / 6) * 4 + (1 / 3) * 1
    assert sliced_wasserstein2(u, v) ** 2 == pytest.approx(expected, rel=1e-12)
    assert wasserstein2(u, v) ** 2 == pytest.approx(expected, rel=1e-9)  # in 1D both are the same distance


def _naive_kernel(a, b):
    return np.mean([math.exp(-float(((a - b) ** 2).sum()) / (2 * h * h)) for h in MMD_BANDWIDTHS])


def test_mmd2_matches_brute_force_and_vanishes_for_identical_sets():
    x, y = _randn(7, seed=7), _randn(5, seed=8, shift=0.3)
    kxx = sum(_naive_kernel(x[i], x[j]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    kyy = sum(_naive_kernel(y[i], y[j]) for i, j in itertools.permutations(range(5), 2)) / (5 * 4)
    kxy = sum(_naive_kernel(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert mmd2_unbiased(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    y6 = _randn(7, seed=9)
    h = sum(_naive_kernel(x[i], x[j]) + _naive_kernel(y6[i], y6[j]) - _naive_kernel(x[i], y6[j])
            - _naive_kernel(x[j], y6[i]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    assert mmd2_unbiased(x, y6) == pytest.approx(h, rel=1e-10)
    assert mmd2_unbiased(x, x) == pytest.approx(0.0, abs=1e-15)


def _naive_prdc(x, y, k):
    d_yy = np.linalg.norm(y[:, None] - y[None], axis=-1)
    d_xx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_yx = np.linalg.norm(y[:, None] - x[None], axis=-1)
    r_y = np.sort(d_yy, axis=1)[:, k]  # column 0 is the point itself
    r_x = np.sort(d_xx, axis=1)[:, k]
    inside = d_yx <= r_y[:, None]  # (ref i, sample j)
    return {
        "precision": inside.any(0).mean(),
        "recall": (d_yx <= r_x[None, :]).any(1).mean(),
        "density": inside.sum() / (k * x.shape[0]),
        "coverage": (d_yx.min(1) <= r_y).mean(),
    }


def test_prdc_matches_naive_computation():
    x, y = _randn(60, seed=10, shift=0.4), _randn(80, seed=11)
    got = prdc(x, y, k=3, chunk=16)
    want = _naive_prdc(x.numpy(), y.numpy(), 3)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    same = prdc(y, y, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_mode_statistics_on_hand_placed_points():
    gmm = make_preset("ring8", dtype=F64)  # 8 equal modes, std 0.1
    means = gmm.means.double()
    # 10 points exactly on each of modes 0..3, nothing near 4..7
    x = means[:4].repeat_interleave(10, 0)
    stats = mode_statistics(x, gmm)
    assert stats["mode_precision"] == 1.0
    assert stats["modes_covered"] == 0.5
    assert stats["mode_tv"] == pytest.approx(0.5)  # 0.5 * (4 |1/4 - 1/8| + 4 |0 - 1/8|)
    assert stats["counts"].tolist() == [10.0] * 4 + [0.0] * 4
    # in 2D the ball holds MODE_MASS of N(0, I_2): |z|^2 ~ Exp(1/2), so r_2 = sqrt(-2 log(1 - MODE_MASS)) = 3.44
    r2 = math.sqrt(-2.0 * math.log1p(-MODE_MASS))
    direction = torch.tensor([0.6, 0.8], dtype=F64)
    near = means[:1] + 0.99 * r2 * 0.1 * direction
    far = means[:1] + 1.01 * r2 * 0.1 * direction
    stats = mode_statistics(torch.cat([near, far]), gmm)
    assert stats["radius"] == pytest.approx(r2, rel=1e-10) and stats["mode_precision"] == 0.5
    # the fixed radius of earlier versions on request: 2.9 std away good, 3.1 std away not
    near, far = means[:1] + 0.29 * direction, means[:1] + 0.31 * direction
    assert mode_statistics(torch.cat([near, far]), gmm, std_threshold=3.0)["mode_precision"] == 0.5
    assert negative_log_likelihood(x, gmm) == pytest.approx(float(-gmm.log_prob(x).mean()), rel=1e-12)


def test_mode_statistics_use_mahalanobis_distance():
    """Anisotropic (full) mode: r std along the minor axis is a short Euclidean distance."""
    gmm = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 0.01]]], dtype=F64)
    r = mode_radius(2)
    x = torch.tensor([[0.99 * r, 0.0], [0.0, 0.099 * r], [0.0, 0.101 * r]], dtype=F64)
    stats = mode_statistics(x, gmm)
    assert stats["mode_precision"] == pytest.approx(2 / 3)
    assert stats["mahalanobis"].tolist() == pytest.approx([0.99 * r, 0.99 * r, 1.01 * r], rel=1e-12)


def test_mode_radius_closed_forms():
    """d = 1: the 3-sigma interval itself; d = 2: |z|^2 ~ Exp(1/2); large d: Wilson-Hilferty's cube-root
    normal approximation of chi^2_d quantiles (accurate to well under 1% at d >= 64)."""
    assert MODE_MASS == pytest.approx(0.9973002039367398, abs=1e-15)
    assert mode_radius(1) == pytest.approx(3.0, rel=1e-12)
    assert mode_radius(2) == pytest.approx(math.sqrt(-2.0 * math.log1p(-MODE_MASS)), rel=1e-12)
    z = 2.7821659340  # standard normal quantile of MODE_MASS (one-sided)
    for d in (64, 256):
        wh = d * (1 - 2 / (9 * d) + z * math.sqrt(2 / (9 * d))) ** 3
        assert mode_radius(d) ** 2 == pytest.approx(wh, rel=2e-3)
    with pytest.raises(ValueError, match="mode_mass"):
        mode_radius(2, mass=1.0)


@pytest.mark.parametrize("dim", [2, 16, 64, 256])
def test_exact_samples_score_one_in_any_dimension(dim):
    """Exact mixture samples sit inside their modes (~MODE_MASS) in every dimension; the old fixed radius of
    3 std rejected almost all of them at d >= 16 (|z| ~ sqrt(d))."""
    n = 2000
    gen = torch.Generator().manual_seed(dim)
    gmm = make_preset("ring8", dim=dim, embed="rotate", seed=1, dtype=F64)
    x = gmm.sample_p0(n, generator=gen, dtype=F64)[0]
    stats = mode_statistics(x, gmm)
    assert stats["mode_precision"] >= 0.99 and stats["modes_covered"] == 1.0
    assert stats["mode_precision"] == pytest.approx(MODE_MASS, abs=4 * math.sqrt(MODE_MASS * (1 - MODE_MASS) / n))
    if dim >= 16:
        assert mode_statistics(x, gmm, std_threshold=3.0)["mode_precision"] < 0.1


def test_exact_samples_of_full_covariance_modes():
    gmm = make_preset("aniso", dim=16, embed="rotate", seed=2, dtype=F64)  # full (K, d, d) covariances
    x = gmm.sample_p0(3000, generator=torch.Generator().manual_seed(5), dtype=F64)[0]
    assert mode_statistics(x, gmm)["mode_precision"] >= 0.99


@pytest.mark.parametrize("dim", [2, 16, 64, 256])
def test_off_mode_samples_score_zero(dim):
    """Three far-apart unit modes; exact samples moved by 2 (sqrt(d) + 3) std along one axis stay assigned to
    their own mode (the modes are 100 std apart) but lie outside its ball: |z + s e| >= s - |z| ~ sqrt(d) + 6."""
    means = torch.zeros(3, dim, dtype=F64)
    means[0, 0], means[1, 1], means[2, 0] = 100.0, 100.0, -100.0
    gmm = GaussianMixture(torch.ones(3), means, torch.ones(3), dtype=F64)
    x = gmm.sample_p0(1000, generator=torch.Generator().manual_seed(dim), dtype=F64)[0]
    shift = torch.zeros(dim, dtype=F64)
    shift[-1] = 2 * (math.sqrt(dim) + 3)
    stats = mode_statistics(x + shift, gmm)
    assert stats["counts"].tolist() == mode_statistics(x, gmm)["counts"].tolist()  # same assignment
    assert stats["mode_precision"] <= 0.01 and stats["modes_covered"] == 0.0
    assert mode_statistics(x, gmm)["mode_precision"] >= 0.99


@pytest.fixture(scope="module")
def ring():
    gmm = make_preset("ring8", dtype=F64)
    draw = lambda n, seed: gmm.sample_p0(n, generator=torch.Generator().manual_seed(seed), dtype=F64)[0]  # noqa: E731
    return gmm, draw


def test_same_distribution_sits_near_floor_and_shift_moves_every_metric_away(ring):
    gmm, draw = ring
    n = 600
    floor = finite_sample_floor(gmm, n, seed=0, max_points=n, num_projections=64)
    x, y = draw(n, 100), draw(n, 200)
    same = sample_quality(x, y, gmm, seed=0, max_points=n, num_projections=64)
    shifted = sample_quality(x + torch.tensor([0.2, 0.0], dtype=F64), y, gmm, seed=0, max_points=n, num_projections=64)
    assert set(same) == set(floor) == set(shifted)
    assert {"w2", "sliced_w2", "mmd2", "precision", "recall", "density", "coverage",
            "mode_precision", "modes_covered", "mode_tv", "nll"} == set(same)
    # near the floor
    assert same["w2"] < 1.5 * floor["w2"] and same["sliced_w2"] < 2.0 * floor["sliced_w2"] + 0.01
    assert abs(same["mmd2"]) < 1e-3 and abs(floor["mmd2"]) < 1e-3
    for key in ("precision", "recall", "coverage", "mode_precision"):
        assert same[key] > floor[key] - 0.08, key
    assert same["modes_covered"] == floor["modes_covered"] == 1.0
    assert same["nll"] == pytest.approx(floor["nll"], abs=0.2)
    # a shift by two mode standard deviations: every metric gets worse, by a clear margin
    for key in ("w2", "sliced_w2", "mmd2", "nll"):
        assert shifted[key] > same[key] + 0.01, key
    for key in ("precision", "recall", "density", "coverage"):
        assert key in HIGHER_IS_BETTER
        assert shifted[key] < same[key] - 0.1, key
    # mode precision of a 2-std shift: P(|z + 2 e| <= r_2) = P(noncentral chi^2(2 dof, 4) <= r_2^2) = 0.894
    p_in = float(ncx2.cdf(mode_radius(2) ** 2, 2, 4.0))
    assert "mode_precision" in HIGHER_IS_BETTER and same["mode_precision"] > 0.98
    assert shifted["mode_precision"] == pytest.approx(p_in, abs=4 * math.sqrt(p_in * (1 - p_in) / n))
    assert shifted["w2"] > 1.4 * floor["w2"] and shifted["mmd2"] > 10 * abs(floor["mmd2"])
    table = quality_table(shifted, floor)
    assert "| w2 |" in table and table.count("\n") == len(shifted) + 1


def test_mode_proportion_metrics_respond_to_reweighting(ring):
    """Mode proportions are blind to small shifts, so perturb them directly: drop two modes."""
    gmm, draw = ring
    n = 800
    floor = finite_sample_floor(gmm, n, seed=1, max_points=300, num_projections=16)
    w = torch.ones(8, dtype=F64)
    w[:2] = 0.0
    x = gmm.transformed(weights=w).sample_p0(n, generator=torch.Generator().manual_seed(3), dtype=F64)[0]
    got = sample_quality(x, draw(n, 4), gmm, seed=1, max_points=300, num_projections=16)
    assert floor["mode_tv"] < 0.08 and floor["modes_covered"] == 1.0
    assert got["mode_tv"] == pytest.approx(0.25, abs=0.05)  # 1/2 (2/8 + 6 |1/6 - 1/8|) = 1/4
    assert got["modes_covered"] == 0.75
    assert got["recall"] < floor["recall"] - 0.15 and got["coverage"] < floor["coverage"] - 0.15
    assert got["mode_precision"] > floor["mode_precision"] - 0.03  # what is there is still on a mode


def test_determinism_given_seed(ring):
    gmm, draw = ring
    x, y = draw(700, 1), draw(650, 2)
    kw = dict(gmm=gmm, max_points=300, num_projections=32)
    a, b = sample_quality(x, y, seed=7, **kw), sample_quality(x, y, seed=7, **kw)
    assert a == b
    c = sample_quality(x, y, seed=8, **kw)
    assert c["w2"] != a["w2"] and c["sliced_w2"] != a["sliced_w2"]  # other subsample, other directions
    assert c["nll"] == a["nll"]  # uses every point
    f1 = finite_sample_floor(lambda n, g: torch.randn(n, 2, generator=g, dtype=F64), 200, seed=3, num_projections=16)
    f2 = finite_sample_floor(lambda n, g: torch.randn(n, 2, generator=g, dtype=F64), 200, seed=3, num_projections=16)
    assert f1 == f2 and "nll" not in f1


def test_spectrum_of_scaled_set_is_scale_squared():
    """x = s y + c: C_x = s^2 C_y exactly, so every rank ratio and the total variance ratio are s^2."""
    y = _randn(500, d=5, seed=20) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)
    x = 0.6 * y + torch.tensor([1.0, -2.0, 0.0, 4.0, 0.5], dtype=F64)
    assert spectrum_ratio(x, y).tolist() == pytest.approx([0.36] * 5, rel=1e-9)
    assert total_variance_ratio(x, y) == pytest.approx(0.36, rel=1e-12)
    spec = covariance_spectrum(y)
    assert torch.all(spec[:-1] >= spec[1:])  # sorted descending
    assert float(spec.sum()) == pytest.approx(float(torch.trace(torch.from_numpy(np.cov(y.numpy().T)))), rel=1e-12)


def test_spectrum_against_gaussian_closed_forms():
    """Independent samples: C = diag(lambda) gives the sorted lambda; N(0, s^2 C) vs N(0, C) gives ~s^2."""
    lam = torch.tensor([0.2, 4.0, 1.0, 0.05], dtype=F64)
    n = 40_000
    y = _randn(n, d=4, seed=21) * lam.sqrt()
    x = _randn(n, d=4, seed=22) * lam.sqrt() * 1.5
    assert covariance_spectrum(y).tolist() == pytest.approx(sorted(lam.tolist(), reverse=True), rel=0.03)
    assert spectrum_ratio(x, y).tolist() == pytest.approx([2.25] * 4, rel=0.05)
    assert total_variance_ratio(x, y) == pytest.approx(2.25, rel=0.03)
    # ranks beyond the reference's rank are NaN: 3 points in 4D have a rank-2 covariance
    assert torch.isnan(spectrum_ratio(x[:3], y[:3])[2:]).all()


def test_posterior_mean_samples_are_shrunk():
    """The L2-optimal deterministic map E[x0 | x_t] shrinks: for p_0 = N(0, v I) and x_t = x0 + sigma eps,
    E[x0 | x_t] = v / (v + sigma^2) x_t, whose variance ratio to p_0 is v / (v + sigma^2)."""
    v, sigma = 0.5, 0.7
    gmm = GaussianMixture([1.0], torch.zeros(1, 3), [v], dtype=F64)
    schedule = EDM()
    g = torch.Generator().manual_seed(23)
    xt = gmm.sample_pt(20_000, sigma, schedule, generator=g, dtype=F64)[0]
    shrunk = gmm.posterior_mean_x0(xt, torch.tensor(sigma, dtype=F64), schedule)
    ref = gmm.sample_p0(20_000, generator=g, dtype=F64)[0]
    expected = v / (v + sigma**2)
    assert total_variance_ratio(shrunk, ref) == pytest.approx(expected, rel=0.04)
    q = sample_quality(shrunk, ref, gmm, max_points=300, num_projections=8, shrinkage=True)
    assert q["variance_ratio"] == pytest.approx(total_variance_ratio(shrunk, ref), rel=1e-12)
    assert "variance_ratio" not in sample_quality(shrunk, ref, gmm, max_points=300, num_projections=8)
    assert "| variance_ratio |" in quality_table(q) and "closer to 1" in quality_table(q)


def test_per_sample_terms_average_to_the_set_metrics(ring):
    gmm, draw = ring
    x, y = draw(400, 30) + 0.03, draw(400, 31)
    terms = per_sample_quality(x, y, gmm)
    q = sample_quality(x, y, gmm, max_points=None, num_projections=8)
    assert set(terms) == {"precision", "density", "mode_good", "nll"}
    assert all(v.shape == (400,) for v in terms.values())
    for key, metric in (("precision", "precision"), ("density", "density"), ("mode_good", "mode_precision"),
                        ("nll", "nll")):
        assert float(terms[key].mean()) == pytest.approx(q[metric], rel=1e-12, abs=1e-15), key
    assert set(per_sample_quality(x, gmm=gmm)) == {"mode_good", "nll"}
    with pytest.raises(ValueError, match="reference"):
        per_sample_quality(x)


def test_input_validation():
    with pytest.raises(ValueError, match="dimensions"):
        sample_quality(_randn(10, 2), _randn(10, 3))
    with pytest.raises(ValueError, match="reference"):
        finite_sample_floor()
