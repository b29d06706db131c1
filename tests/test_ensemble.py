"""toys.ensemble: stacked members equal solo networks, and ensemble training equals solo training."""
from __future__ import annotations

import math

import pytest
import torch

from odecm.grids import skip
from odecm.schedules import sdxl_schedule
from odecm.solvers import solve
from toys.ensemble import (EnsembleMLP, Route, TargetPool, TrainConfig, clip_grad_norm_per_member, init_from_teacher,
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


# --- k-step targets, the two-phase schedule, evaluation callbacks, the NaN guard ---------------------

from toys.ensemble import NonFiniteTrainingError, RoutedTarget, ensemble_loss  # noqa: E402
from toys.ensemble_train import draw_batch  # noqa: E402
from odecm.training import EMATarget  # noqa: E402


def _batch_and_student(solver, seed=0):
    pool = TargetPool.build(TEACHER, solver, GRID, SCH, sample_data, 512, seed=seed, dtype=torch.float64)
    st = make_ensemble_student(CFG, SCH, [3, 4], dtype=torch.float64)
    routes = [Route(TEACHER, solver, pool)] * 2
    cfg = TrainConfig(batch_size=16, train_steps=10)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = draw_batch(cfg, routes, gens, GRID, SCH, sample_data, torch.float64)
    return st, routes, cfg, batch


@pytest.mark.parametrize("solver", ["ddim", "heun_vp"])
def test_k_step_target_k1_is_cd_and_k_all_is_direct_cd(solver):
    """Same batch, same student: k = 1 gives CD's loss exactly, k = 'all' gives Direct CD's (pool endpoints)."""
    st, routes, cfg, batch = _batch_and_student(solver)
    target = EMATarget(st.f, 0.0)
    cd = ensemble_loss(cfg, st, RoutedTarget("cd", routes, 16, GRID, target_fn=target), batch, GRID)
    k1 = ensemble_loss(cfg, st, RoutedTarget("cd_k", routes, 16, GRID, target_fn=target, k=1), batch, GRID)
    assert torch.equal(cd["member_loss"], k1["member_loss"])
    direct = ensemble_loss(cfg, st, None, batch, GRID, direct=True)
    N = GRID.numel() - 1
    kall = ensemble_loss(cfg, st, RoutedTarget("cd_k", routes, 16, GRID, target_fn=target, k=N), batch, GRID)
    torch.testing.assert_close(kall["member_loss"], direct["member_loss"], rtol=1e-10, atol=1e-12)
    assert TrainConfig(method="cd_k", k="all").k_steps(N) == N
    # in between, k = 2 is neither: its targets take two teacher steps and then the target network
    k2 = ensemble_loss(cfg, st, RoutedTarget("cd_k", routes, 16, GRID, target_fn=target, k=2), batch, GRID)
    assert not torch.allclose(k2["member_loss"], cd["member_loss"]) and not torch.allclose(k2["member_loss"], direct["member_loss"])


def test_train_config_k_and_phases_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs k"):
        TrainConfig(method="cd_k")
    with pytest.raises(ValidationError, match="k is used by method='cd_k' only"):
        TrainConfig(method="cd", k=2)
    with pytest.raises(ValidationError, match="allowed: an integer >= 1"):
        TrainConfig(method="cd_k", k=0)
    with pytest.raises(ValidationError, match="direct_first_steps"):
        TrainConfig(method="direct_cd", direct_first_steps=5)
    with pytest.raises(ValidationError, match="must be < train_steps"):
        TrainConfig(method="cd", direct_first_steps=10, train_steps=10)
    with pytest.raises(ValidationError, match="lr"):
        TrainConfig(lr=float("inf"))


def test_direct_cd_then_cd_schedule_runs_and_its_first_phase_is_direct_cd():
    pools = {"ddim": TargetPool.build(TEACHER, "ddim", GRID, SCH, sample_data, 256, seed=1, dtype=torch.float64)}
    routes = [Route(TEACHER, "ddim", pools["ddim"])] * 2
    common = dict(batch_size=12, lr=1e-2, warmup_steps=2, lr_schedule="constant", log_every=1)
    st_a = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    two = train_ensemble(TrainConfig(method="cd", direct_first_steps=3, train_steps=6, **common), st_a, routes, GRID,
                         sample_data, progress=False)
    st_b = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    direct = train_ensemble(TrainConfig(method="direct_cd", train_steps=3, **common), st_b, routes, GRID, sample_data,
                            progress=False)
    assert two.phase == ["direct_cd"] * 3 + ["cd"] * 3
    torch.testing.assert_close(torch.tensor(two.loss[:3]), torch.tensor(direct.loss), rtol=1e-12, atol=0)
    assert two.teacher_evals > 0  # the CD phase calls the teacher online
    # k-step CD trains too (two teacher steps per sample, then the target network)
    st_c = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    k2 = train_ensemble(TrainConfig(method="cd_k", k=2, train_steps=3, **common), st_c, routes, GRID, sample_data,
                        progress=False)
    assert k2.teacher_evals > 0 and all(math.isfinite(v) for row in k2.loss for v in row)


def test_eval_callback_sees_the_steps_and_the_ema_weights():
    pool = TargetPool.build(TEACHER, "ddim", GRID, SCH, sample_data, 256, seed=1, dtype=torch.float64)
    st = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    seen = []

    def on_eval(step, student, ema):
        seen.append((step, ema is not None and not torch.equal(ema.net.weights[0], student.net.weights[0])))

    cfg = TrainConfig(method="cd", train_steps=6, batch_size=8, lr=1e-2, ema_rate=0.9, warmup_steps=1)
    train_ensemble(cfg, st, Route(TEACHER, "ddim", pool), GRID, sample_data, progress=False, eval_steps=[2, 6],
                   on_eval=on_eval)
    assert seen == [(2, True), (6, True)]
    with pytest.raises(ValueError, match="eval_steps"):
        train_ensemble(cfg, st, Route(TEACHER, "ddim", pool), GRID, sample_data, progress=False, eval_steps=[7],
                       on_eval=on_eval)


def test_batch_seeds_set_the_data_stream_independently_of_the_initialisation():
    pool = TargetPool.build(TEACHER, "ddim", GRID, SCH, sample_data, 256, seed=1, dtype=torch.float64)
    cfg = TrainConfig(method="direct_cd", train_steps=3, batch_size=8, lr=1e-2, log_every=1)

    def losses(batch_seeds):
        st = make_ensemble_student(CFG, SCH, [5, 5], dtype=torch.float64)
        return torch.tensor(train_ensemble(cfg, st, Route(TEACHER, "ddim", pool), GRID, sample_data, progress=False,
                                           batch_seeds=batch_seeds).loss)

    same, diff = losses([7, 7]), losses([7, 8])
    assert torch.equal(same[:, 0], same[:, 1])  # same init, same batches: identical members
    assert torch.equal(diff[:, 0], same[:, 0]) and not torch.equal(diff[:, 1], diff[:, 0])


def test_one_step_takes_shared_or_per_member_noise():
    st = make_ensemble_student(CFG, SCH, [1, 2, 3], dtype=torch.float64)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    own = st.one_step(x, 999.0)
    for m in range(3):
        torch.testing.assert_close(own[m], st.one_step(x[m], 999.0)[m], rtol=0, atol=0)


def _poison(student, member):
    with torch.no_grad():
        student.net.weights[0][member].fill_(float("nan"))


def test_nan_guard_names_the_member_and_stops():
    pool = TargetPool.build(TEACHER, "ddim", GRID, SCH, sample_data, 256, seed=1, dtype=torch.float64)
    st = make_ensemble_student(CFG, SCH, [0, 1, 2], dtype=torch.float64)
    _poison(st, 1)
    cfg = TrainConfig(method="cd", train_steps=5, batch_size=8)
    with pytest.raises(NonFiniteTrainingError, match=r"member 1 \(init seed 1.*non-finite loss nan at step 0") as err:
        train_ensemble(cfg, st, Route(TEACHER, "ddim", pool, label="exact"), GRID, sample_data, progress=False)
    assert (err.value.member, err.value.step, err.value.kind) == (1, 0, "loss")
    # a learning rate that diverges (finite, so the config accepts it) is caught at the first bad step
    st = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    huge = cfg.model_copy(update={"lr": 1e300, "grad_clip": None, "warmup_steps": 0})
    with pytest.raises(NonFiniteTrainingError, match="member 0") as err:
        train_ensemble(huge, st, Route(TEACHER, "ddim", pool), GRID, sample_data, progress=False)
    assert err.value.step >= 1
    st = make_ensemble_student(CFG, SCH, [0, 1], dtype=torch.float64)
    _poison(st, 0)
    with pytest.raises(NonFiniteTrainingError, match="member 0.*init loss"):
        init_from_teacher(st, Route(TEACHER, "ddim"), GRID, sample_data, steps=3, batch_size=8)
