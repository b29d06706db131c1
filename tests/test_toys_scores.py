"""Teacher variants: exact, wrong_gmm, nonconservative, learned (cached), and score_error."""
import pytest
import torch

from odecm.schedules import make_schedule
from toys.gmm import make_preset
from toys.scores import (
    learned,
    make_teacher,
    nonconservative,
    perturbed_gmm,
    rotation_generator,
    score_error,
    wrong_gmm,
)


@pytest.fixture(scope="module")
def world():
    return make_preset("ring8"), make_schedule("vp")


def _points(g, sch, t, n=256, seed=0):
    x, _ = g.sample_pt(n, t, sch, torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x


def test_wrong_gmm_zero_equals_exact_bitwise(world):
    g, sch = world
    for preset in ["ring8", "aniso"]:
        gg = make_preset(preset)
        x = _points(gg, sch, 0.3)
        p0 = make_teacher("exact", gg, sch)(x, 0.3)
        p1 = wrong_gmm(gg, sch, delta=0.0, seed=3)(x, 0.3)
        assert torch.equal(p0.x0, p1.x0) and torch.equal(p0.eps, p1.eps)


def test_wrong_gmm_perturbation_sizes(world):
    g, sch = world
    q = perturbed_gmm(g, 0.2, seed=1)
    shift = (q.means - g.means).norm(dim=-1)
    assert torch.allclose(shift, torch.full_like(shift, 0.2 * g.mode_spacing()), rtol=1e-12)
    assert torch.allclose(q.covs, 1.2**2 * g.covs, rtol=1e-12)
    den = wrong_gmm(g, sch, delta=0.2, seed=1)
    assert torch.allclose(den.gmm.means, q.means)  # the perturbed data distribution is exposed
    x = _points(g, sch, 0.2)
    diff = (den(x, 0.2).eps - g.exact_denoiser(sch)(x, 0.2).eps).pow(2).mean()
    assert float(diff) > 1e-3
    # a perfect solve of this teacher samples q: its samples sit around q's means
    xq, lab = den.gmm.sample_p0(2000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(xq.mean(0), q.mean(), atol=0.05)


def _jacobian(den, x, t):
    return torch.autograd.functional.jacobian(lambda v: den(v[None], t).eps[0], x)


def test_nonconservative_curl_and_zero_delta(world):
    g, sch = world
    x = _points(g, sch, 0.4, n=8)
    exact = g.exact_denoiser(sch)
    nc0 = nonconservative(g, sch, delta=0.0)
    p, q = exact(x, 0.4), nc0(x, 0.4)
    assert torch.equal(p.eps, q.eps) and torch.equal(p.x0, q.x0)
    delta = 0.3
    nc = make_teacher("nonconservative", g, sch, delta=delta)
    tt = torch.tensor(0.4, dtype=torch.float64)
    a, s = float(sch.alpha(tt)), float(sch.sigma(tt))
    norm = (a * a * g.data_std() ** 2 + s * s) ** 0.5
    J = rotation_generator(2)
    for i in range(3):
        je = _jacobian(exact, x[i], 0.4)
        assert torch.allclose(je, je.T, atol=1e-10)  # exact eps is a gradient field: symmetric Jacobian
        jn = _jacobian(nc, x[i], 0.4)
        antisym = 0.5 * (jn - jn.T)
        assert torch.allclose(antisym, delta * J / norm, atol=1e-10)  # curl = 2 delta / norm
        assert abs(float(torch.trace(jn - je))) < 1e-10  # divergence-free perturbation
    diff = (nc(x, 0.4).eps - p.eps).norm(dim=-1)
    assert float(diff.mean()) > 0.05


def test_learned_is_cached_and_beats_untrained(world, tmp_path):
    g, sch = world
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    kw = dict(budget=400, seed=0, width=32, depth=2, cache_dir=tmp_path)
    first = learned(g, sch, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert not first.loaded_from_cache and first.train_steps_run == 400
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and any(f.endswith(".safetensors") for f in files) and any(f.endswith(".json") for f in files)
    mtime = first.cache_path.stat().st_mtime_ns
    second = make_teacher("learned", g, sch, **kw)
    assert second.loaded_from_cache and second.train_steps_run == 0
    assert first.cache_path.stat().st_mtime_ns == mtime
    for (k, v), (_, w) in zip(first.net.state_dict().items(), second.net.state_dict().items()):
        assert torch.equal(v, w), k
    other = learned(g, sch, **{**kw, "seed": 1, "budget": 0})
    assert not other.loaded_from_cache  # a different config is a different cache entry
    err_trained = score_error(second, g, sch, n=1024, generator=torch.Generator().manual_seed(0))
    err_untrained = score_error(other, g, sch, n=1024, generator=torch.Generator().manual_seed(0))
    assert err_trained.mean < 0.5 * err_untrained.mean
    assert err_trained.per_t.shape == (32,)


def test_score_error_values(world):
    g, sch = world
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    zero = score_error(g.exact_denoiser(sch), g, sch, n=256, generator=gen())
    assert zero.mean < 1e-10
    t_grid = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    nc = score_error(nonconservative(g, sch, 0.2), g, sch, n=4096, t_grid=t_grid, generator=gen())
    # |delta J (x - alpha c)|^2 / d / (alpha^2 v + s^2) has expectation delta^2 under p_t (J is a rotation)
    assert torch.allclose(nc.per_t, torch.full((3,), 0.04, dtype=torch.float64), rtol=0.08)
    w = score_error(nonconservative(g, sch, 0.2), g, sch, n=256, t_grid=t_grid, weighting=torch.tensor([1.0, 0, 0]), generator=gen())
    assert w.mean == pytest.approx(float(w.per_t[0]))
    with pytest.raises(ValueError, match="allowed"):
        score_error(g.exact_denoiser(sch), g, sch, n=8, weighting="bogus")


def test_registry_errors(world):
    g, sch = world
    with pytest.raises(ValueError, match="allowed"):
        make_teacher("nope", g, sch)
    with pytest.raises(ValueError, match="allowed"):
        make_teacher("wrong_gmm", g, sch, sigma=1.0)
