"""toys.metrics: exact values on small problems, closed forms, the finite-sample floor, and monotone
response to a shifted sample set."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from toys.gmm import GaussianMixture, make_preset
from toys.metrics import (
    HIGHER_IS_BETTER,
    MMD_BANDWIDTHS,
    finite_sample_floor,
    mmd2_unbiased,
    mode_statistics,
    negative_log_likelihood,
    prdc,
    quality_table,
    sample_quality,
    sliced_wasserstein2,
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
    # 2.9 std away: still good; 3.1 std away: not
    direction = torch.tensor([0.6, 0.8], dtype=F64)
    near = means[:1] + 0.29 * direction
    far = means[:1] + 0.31 * direction
    assert mode_statistics(torch.cat([near, far]), gmm)["mode_precision"] == 0.5
    assert negative_log_likelihood(x, gmm) == pytest.approx(float(-gmm.log_prob(x).mean()), rel=1e-12)


def test_mode_statistics_use_mahalanobis_distance():
    """Anisotropic mode: 3 std along the minor axis is a short Euclidean distance."""
    gmm = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 0.01]]], dtype=F64)
    x = torch.tensor([[2.9, 0.0], [0.0, 0.29], [0.0, 0.31]], dtype=F64)
    assert mode_statistics(x, gmm)["mode_precision"] == pytest.approx(2 / 3)


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
    for key in ("precision", "recall", "density", "coverage", "mode_precision"):
        assert key in HIGHER_IS_BETTER
        assert shifted[key] < same[key] - 0.1, key
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


def test_input_validation():
    with pytest.raises(ValueError, match="dimensions"):
        sample_quality(_randn(10, 2), _randn(10, 3))
    with pytest.raises(ValueError, match="reference"):
        finite_sample_floor()
