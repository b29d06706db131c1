"""Image world numerics: the exact empirical teacher (score, ODE), LoRA at step 0, target pools, metrics, cache keys."""
import json

import pytest
import torch

from odecm.consistency import ConsistencyFunction, LCMBoundary
from odecm.grids import skip
from odecm.schedules import sdxl_schedule
from odecm.solvers import get_solver, solve
from toys.image_world.cache import CacheEntry, cached_module, config_key
from toys.image_world.exact import EmpiricalDenoiser, exact_ode_endpoint
from toys.image_world.lora import adapters_disabled, lora_parameters
from toys.image_world.metrics import class_tv, memorisation, radial_power, shrinkage
from toys.image_world.students import StudentConfig, make_students
from toys.image_world.teachers import GuidanceConfig, UNetDenoiser, guided
from toys.image_world.training import build_pool
from toys.image_world.unet import ConvUNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SCH = sdxl_schedule(timestep_offset=1)


def _images(K=60, shape=(1, 4, 4), seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(K, *shape, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.arange(K) % classes


@pytest.mark.parametrize("t", [5.0, 100.0, 700.0])
def test_empirical_eps_is_minus_sigma_grad_log_density(t):
    pts, _ = _images()
    den = EmpiricalDenoiser(pts, SCH)
    a, s = float(SCH.alpha(torch.tensor(t, dtype=torch.float64))), float(SCH.sigma(torch.tensor(t, dtype=torch.float64)))
    x = a * pts[:16] + s * torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xr = x.reshape(16, -1).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(den.mixture.log_prob_t(xr, t, SCH).sum(), xr)
    pred = den(x, torch.full((16,), t, dtype=torch.float64))
    assert torch.allclose(pred.eps.reshape(16, -1), -s * grad, atol=1e-9, rtol=1e-9)
    assert torch.allclose(a * pred.x0 + s * pred.eps, x, atol=1e-10)
    # the posterior mean is a convex combination of the training images
    d2 = ((x.reshape(16, 1, -1) - a * pts.reshape(1, 60, -1)) ** 2).sum(-1)
    r = torch.softmax(-d2 / (2 * s * s), -1)
    assert torch.allclose(pred.x0.reshape(16, -1), r @ pts.reshape(60, -1), atol=1e-10)


def test_conditional_empirical_teacher_and_guidance():
    pts, labels = _images()
    den = EmpiricalDenoiser(pts, SCH, labels, num_classes=3)
    x = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    t = torch.full((9,), 300.0, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])  # 3 = the null label: unconditional
    pred = den(x, t, cond)
    for c in range(4):
        rows = cond == c
        ref = EmpiricalDenoiser(pts if c == 3 else pts[labels == c], SCH)(x[rows], t[rows])
        assert torch.allclose(pred.x0[rows], ref.x0, atol=1e-12)
    # imagen w = 1 is the conditional teacher; w = 0 the unconditional one
    for w, want in [(1.0, cond.clamp(max=2)), (0.0, torch.full_like(cond, 3))]:
        cfg_den = guided(den, GuidanceConfig(scale=w, convention="imagen"), 3)
        assert torch.allclose(cfg_den(x, t, cond.clamp(max=2)).eps, den(x, t, want).eps, atol=1e-10)


def test_exact_ode_returns_a_training_image_from_its_own_noisy_version():
    pts, labels = _images(K=45, shape=(1, 4, 4))
    den = EmpiricalDenoiser(pts, SCH)
    for t in (10.0, 60.0):
        a, s = float(SCH.alpha(torch.tensor(t, dtype=torch.float64))), float(SCH.sigma(torch.tensor(t, dtype=torch.float64)))
        x_t = a * pts[:10] + s * torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        flat = den.mixture.exact_ode_solution(x_t.reshape(10, -1), t, 0.0, SCH, rtol=1e-8, atol=1e-8)
        assert (flat.reshape(10, 1, 4, 4) - pts[:10]).abs().max() < 1e-10
    # the generic endpoint routine (adaptive solve to the one-hot level, then x0_hat) agrees with toys.gmm's
    x_T = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = exact_ode_endpoint(den, x_T, 1000.0, den.floor_sigma(), rtol=1e-6, atol=1e-6)
    b = den.mixture.exact_ode_solution(x_T.reshape(12, -1), 1000.0, 0.0, SCH, rtol=1e-6, atol=1e-6).reshape(a.shape)
    assert torch.allclose(a, b, atol=1e-9)
    # guided by class (imagen w = 1: the conditional ODE) the endpoint is an image of the asked class
    cden = EmpiricalDenoiser(pts, SCH, labels, num_classes=3)
    want = torch.arange(12) % 3
    end = exact_ode_endpoint(guided(cden, GuidanceConfig(scale=1.0), 3), x_T, 1000.0, cden.floor_sigma(), want, 1e-6, 1e-6)
    nearest = ((end.reshape(12, 1, -1) - pts.reshape(1, 45, -1)) ** 2).sum(-1).min(1)
    assert nearest.values.max() < 1e-18 and torch.equal(labels[nearest.indices], want)


def test_lora_student_at_step_zero_is_the_teachers_boundary_wrapped_denoiser():
    torch.manual_seed(0)
    net = ConvUNet(1, UNetConfig(channels=[8, 16], emb_dim=16), num_classes=0)
    teacher = UNetDenoiser(net, SCH, "eps", 0.6)
    st = make_students("lora", StudentConfig(lora_rank=2), [0, 1], (1, 8, 8), SCH, 0.6, teacher=teacher)
    ref = ConsistencyFunction(teacher, LCMBoundary())
    x = torch.randn(6, 1, 8, 8)
    t = torch.tensor([0.0, 1.0, 50.0, 300.0, 700.0, 1000.0])
    with torch.no_grad():
        for m in range(2):
            assert torch.equal(st.member_function(m)(x, t), ref(x, t))
        assert torch.equal(st.f(torch.cat([x, x]), torch.cat([t, t])), torch.cat([ref(x, t)] * 2))
        # only the adapters train; once they move the student differs, and with adapters off it is the teacher again
        assert all(not p.requires_grad for n, p in st.stack.members[0].named_parameters() if ".base." in n)
        for p in lora_parameters(st.stack.members[0]):
            p.add_(0.1)
        moved = st.member_function(0)(x, t)
        assert (moved - ref(x, t)).abs().max() > 1e-3
        with adapters_disabled(st.stack.members[0]):
            assert torch.equal(st.member_function(0)(x, t), ref(x, t))


def test_pool_holds_the_solver_endpoint_and_first_step():
    pts, labels = _images(K=30)
    den = EmpiricalDenoiser(pts, SCH)
    grid = skip(SCH, 10)
    for solver in ("ddim", "heun"):
        pool = build_pool(den, solver, grid, pts, None, 40, seed=5, dtype=torch.float64, chunk=16,
                          store_dtype=torch.float64)  # float64 rows: the exact teacher's chain amplifies rounding
        ref = solve(solver, den, pool.x_tn, grid, pool.n).x
        assert torch.allclose(pool.endpoint, ref, atol=1e-12)
        one = get_solver(solver).step(den, pool.x_tn, grid[pool.n], grid[pool.n - 1])
        assert torch.allclose(pool.x_prev, one, atol=1e-12)
        # DDIM: n evaluations per row; Heun: 2 per step but none for the corrector of the last step (sigma = 0)
        assert pool.teacher_evals == int(pool.n.sum()) * (1 if solver == "ddim" else 2) - (0 if solver == "ddim" else 40)
        noise = (pool.x_tn - SCH.alpha(grid[pool.n]).reshape(-1, 1, 1, 1) * pool.x0) / SCH.sigma(grid[pool.n]).reshape(-1, 1, 1, 1)
        assert abs(float(noise.std()) - 1.0) < 0.1 and int(pool.n.min()) >= 1 and int(pool.n.max()) <= 10


def test_metrics_on_known_inputs():
    train, _ = _images(K=50, shape=(1, 8, 8))
    train = train.float()
    assert memorisation(train[:10] + 0.01, train, 0.1) == 1.0
    assert memorisation(torch.zeros(5, 1, 8, 8) + 5.0, train, 0.1) == 0.0
    assert class_tv(torch.arange(10), 10) == pytest.approx(0.0)
    assert class_tv(torch.zeros(10, dtype=torch.long), 10) == pytest.approx(0.9)
    const = torch.ones(4, 1, 8, 8)
    p = radial_power(const)
    assert p[0] == pytest.approx(64.0) and float(p[1:].abs().max()) < 1e-20
    blurred = torch.nn.functional.avg_pool2d(train, 3, stride=1, padding=1, count_include_pad=False)
    s = shrinkage(blurred, train)
    assert s["hf_power_ratio"] < 0.5 and s["variance_ratio"] < 1.0
    assert shrinkage(train, train) == {"variance_ratio": pytest.approx(1.0), "hf_power_ratio": pytest.approx(1.0)}


def test_cache_is_keyed_by_config_and_rebuilt_when_it_changes(tmp_path):
    calls = []

    def train(m):
        calls.append(1)
        with torch.no_grad():
            m.weight.fill_(float(len(calls)))
        return {"n": len(calls)}

    cfg = {"what": "x", "steps": 10}
    m1, i1 = cached_module("toy", cfg, torch.nn.Linear(2, 2), train, tmp_path)
    m2, i2 = cached_module("toy", cfg, torch.nn.Linear(2, 2), train, tmp_path)
    assert (i1["cache"], i2["cache"], len(calls)) == ("built", "hit", 1)
    assert torch.equal(m1.weight, m2.weight) and i2["n"] == 1
    m3, i3 = cached_module("toy", {**cfg, "steps": 11}, torch.nn.Linear(2, 2), train, tmp_path)
    assert i3["cache"] == "built" and len(calls) == 2 and float(m3.weight[0, 0]) == 2.0 and i3["key"] != i1["key"]
    entry = CacheEntry("toy", cfg, tmp_path)
    assert json.loads(entry.meta.read_text())["config"] == cfg
    assert not list(entry.weights.parent.glob("*.tmp*"))
    assert config_key(cfg) == config_key(dict(reversed(list(cfg.items()))))  # canonical JSON
