"""toys.ensemble: stacked members equal solo networks, and ensemble training equals solo training."""
from __future__ import annotations

import pytest
import torch

from odecm.grids import skip
from odecm.schedules import sdxl_schedule
from odecm.solvers import solve
from toys.ensemble import (EnsembleMLP, Route, TargetPool, TrainConfig, clip_grad_norm_per_member,
                           make_ensemble_student, train_ensemble)
from toys.gmm import make_preset
from toys.networks import MLP, NetworkConfig, make_student

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: extra threads only add sync cost


CFG = NetworkConfig(width=32, depth=2, num_frequencies=4, time_embedding="fourier")
SCH = sdxl_schedule()
GRID = skip(SCH, 20)
GMM = make_preset("ring8", dtype=torch.float64)
TEACHER = GMM.exact_denoiser(SCH)


def sample_data(n, g):
    return GMM.sample_p0(n, generator=g, dtype=torch.float64)[0]


def test_member_forward_equals_solo_mlp():
    seeds = [3, 7, 11]
    ens = EnsembleMLP.from_seeds(CFG, seeds).double()
    x = torch.randn(3 * 10, 2, dtype=torch.float64)
    u = torch.rand(30, dtype=torch.float64)
    out = ens(x, u)
    for m, s in enumerate(seeds):
        solo = MLP(CFG, torch.Generator().manual_seed(s)).double()
        torch.testing.assert_close(out[m * 10:(m + 1) * 10], solo(x[m * 10:(m + 1) * 10], u[m * 10:(m + 1) * 10]),
                                   rtol=1e-12, atol=1e-12)
        extracted = ens.member(m)
        assert all(torch.equal(p, q) for p, q in zip(extracted.state_dict().values(), solo.state_dict().values()))
    with pytest.raises(ValueError, match="multiple"):
        ens(x[:29], u[:29])


def test_student_wrapper_matches_make_student():
    st = make_ensemble_student(CFG, SCH, [5, 6], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = st.one_step(x, 999.0)
    for m, s in enumerate([5, 6]):
        solo = make_student(CFG, SCH, seed=s).double()
        torch.testing.assert_close(out[m], st.member_student(m)(x, 999.0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.member_student(m).denoiser(x, 500.0).x0, solo(x, 500.0).x0)


def test_per_member_clip_matches_torch_clip():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4, 5)), torch.nn.Parameter(torch.randn(3, 1, 5))]
    for p in ps:
        p.grad = torch.randn_like(p) * torch.tensor([0.01, 1.0, 10.0]).reshape(3, 1, 1)
    solo = [[torch.nn.Parameter(p[m].clone()) for p in ps] for m in range(3)]
    for m in range(3):
        for q, p in zip(solo[m], ps):
            q.grad = p.grad[m].clone()
    norms = clip_grad_norm_per_member(ps, 1.0)
    for m in range(3):
        ref = torch.nn.utils.clip_grad_norm_(solo[m], 1.0)
        assert float(norms[m]) == pytest.approx(float(ref), rel=1e-6)
        for q, p in zip(solo[m], ps):
            torch.testing.assert_close(p.grad[m], q.grad)
    assert float(norms[0]) < 1 < float(norms[2])


def test_pool_endpoints_are_the_teacher_solver_solution():
    pool = TargetPool.build(TEACHER, "heun", GRID, SCH, sample_data, 64, seed=4, chunk=20, dtype=torch.float64)
    torch.testing.assert_close(pool.x_tn, SCH.alpha(GRID[pool.n])[:, None] * pool.x0
                               + SCH.sigma(GRID[pool.n])[:, None] * pool.noise)
    for i in (0, 17, 63):
        ref = solve("heun", TEACHER, pool.x_tn[i:i + 1], GRID, int(pool.n[i])).x
        torch.testing.assert_close(pool.endpoint[i:i + 1], ref, rtol=1e-10, atol=1e-10)
    assert 1 <= int(pool.n.min()) and int(pool.n.max()) <= 20


def _train(method, seeds, solvers, data, pools, ema_rate=0.0, steps=8):
    st = make_ensemble_student(CFG, SCH, seeds, dtype=torch.float64)
    routes = [Route(TEACHER, s, pools.get(s)) for s in solvers]
    cfg = TrainConfig(method=method, train_steps=steps, batch_size=12, lr=1e-2, warmup_steps=2, data=data,
                      ema_rate=ema_rate, grad_clip=0.5, log_every=1)
    hist = train_ensemble(cfg, st, routes, GRID, sample_data, progress=False)
    return st, hist


@pytest.mark.parametrize("method,data,ema", [("cd", "pool", 0.0), ("cd", "fresh", 0.9),
                                             ("direct_cd", "pool", 0.0), ("direct_cd", "fresh", 0.0)])
def test_ensemble_training_equals_solo_training(method, data, ema):
    """Each member of a jointly trained ensemble (mixed solvers) ends exactly where training it alone ends."""
    pools = {s: TargetPool.build(TEACHER, s, GRID, SCH, sample_data, 256, seed=1, dtype=torch.float64)
             for s in ("ddim", "heun")}
    seeds, solvers = [0, 1, 2], ["ddim", "heun", "ddim"]
    ens, hist = _train(method, seeds, solvers, data, pools, ema)
    assert len(hist.loss[0]) == 3 and hist.teacher_evals >= 0
    moved = False
    for m, (seed, solver) in enumerate(zip(seeds, solvers)):
        solo, solo_hist = _train(method, [seed], [solver], data, pools, ema)
        for p_ens, p_solo in zip(ens.net.parameters(), solo.net.parameters()):
            torch.testing.assert_close(p_ens[m], p_solo[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(torch.tensor(hist.loss)[:, m], torch.tensor(solo_hist.loss)[:, 0],
                                   rtol=1e-9, atol=1e-12)
        init = make_ensemble_student(CFG, SCH, [seed], dtype=torch.float64)
        moved |= bool((init.net.weights[0] - solo.net.weights[0]).abs().max() > 1e-3)
    assert moved  # training did something


def test_cd_loss_decreases_on_exact_teacher():
    pools = {"ddim": TargetPool.build(TEACHER, "ddim", GRID, SCH, sample_data, 2048, seed=1, dtype=torch.float64)}
    _, hist = _train("direct_cd", [0, 1], ["ddim", "ddim"], "pool", pools, steps=60)
    first, last = torch.tensor(hist.loss[0]), torch.tensor(hist.final_loss())
    assert bool((last < 0.5 * first).all())
