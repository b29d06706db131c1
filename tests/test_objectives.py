"""CD and Direct CD objectives on Gaussian data, where every map is known in closed form."""

import pytest
import torch

from gaussian_problem import GaussianDenoiser, LinearPerIndexStudent, flow
from odecm import grids, objectives as O, schedules, solvers
from odecm.consistency import ConsistencyFunction, EDMBoundary, LCMBoundary
from odecm.denoisers import Denoiser
from odecm.training import EMATarget

MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
VAR = 0.25


def _problem(n_steps=10):
    sch = schedules.sdxl_schedule()
    grid = grids.skip(sch, n_steps)
    return sch, grid, GaussianDenoiser(sch, MEAN, VAR)


class ExactConsistency(torch.nn.Module):
    """The exact consistency function of the Gaussian problem: the closed-form flow to grid[0]."""

    def __init__(self, sch, grid):
        super().__init__()
        self.sch, self.grid = sch, grid

    def forward(self, x, t, cond=None):
        return flow(self.sch, x, t, self.grid[0].expand(x.shape[0]), MEAN, VAR)


@pytest.mark.parametrize("boundary", ["lcm", "edm"])
def test_boundary_condition_is_exact(boundary):
    sch = schedules.sdxl_schedule()
    bnd = LCMBoundary() if boundary == "lcm" else EDMBoundary(sch, t_min=0.0)

    class Junk(Denoiser):
        def forward(self, x, t, cond=None):
            return self.from_x0(x, t, 5 * torch.ones_like(x))

    f = ConsistencyFunction(Junk(sch), bnd)
    x = torch.randn(7, 3, 4)
    assert torch.equal(f(x, 0.0), x)
    # away from the boundary the network output matters
    assert (f(x, 500.0) - x).abs().max() > 1.0


def test_exact_map_gives_solver_error_as_direct_cd_loss_and_consistent_cd_loss():
    sch, grid, teacher = _problem(10)
    f = ExactConsistency(sch, grid)
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + VAR**0.5 * torch.randn(512, 2, generator=g, dtype=torch.float64)
    n = O.draw_indices(512, 10, generator=g)
    noise = torch.randn(512, 2, generator=g, dtype=torch.float64)
    x_tn = O.add_noise(sch, x0, grid[n], noise)
    # Direct CD: loss == mean squared distance between exact flow and the DDIM chain
    direct = O.consistency_loss(f, O.DirectCDTarget(teacher, "ddim", grid), None, n, grid, sch, x_tn=x_tn)
    chain = solvers.solve("ddim", teacher, x_tn, grid, n).x
    solver_err = ((flow(sch, x_tn, grid[n], grid[0].expand(512), MEAN, VAR) - chain) ** 2).mean(1)
    assert direct["loss"].item() == pytest.approx(solver_err.mean().item(), rel=1e-10)
    assert direct["loss"].item() > 1e-5  # DDIM with 10 steps is visibly inexact
    # CD: per sample, the exact map's CD residual is the *one-step* solver error carried by the flow
    cd = O.consistency_loss(f, O.CDTarget(teacher, "ddim", grid, f), None, n, grid, sch, x_tn=x_tn)
    one_step = solvers.get_solver("ddim").step(teacher, x_tn, grid[n], grid[n - 1])
    exact_prev = flow(sch, x_tn, grid[n], grid[n - 1], MEAN, VAR)
    expected = ((flow(sch, exact_prev, grid[n - 1], grid[0].expand(512), MEAN, VAR)
                 - flow(sch, one_step, grid[n - 1], grid[0].expand(512), MEAN, VAR)) ** 2).mean(1)
    assert torch.allclose(cd["per_sample"], expected, rtol=1e-9, atol=1e-18)
    # a single local error is smaller than the accumulated one
    assert cd["loss"].item() < direct["loss"].item()
    assert direct["target_evals"] == int(n.sum())
    assert cd["target_evals"] == 512


@pytest.mark.parametrize("method", ["cd", "direct_cd"])
def test_linear_student_converges_to_solver_map(method):
    """Trained per-index linear students reach the teacher solver's own flow map (the fixed point of
    both objectives), which differs from the exact flow by the solver's discretisation error."""
    torch.manual_seed(0)
    sch, grid, teacher = _problem(5)
    student = LinearPerIndexStudent(sch, grid, 2)
    f = ConsistencyFunction(student, LCMBoundary())
    provider = O.make_target_provider(method, teacher, "ddim", grid, target_fn=EMATarget(f, 0.0))
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(student.parameters(), lr=5e-2)
    for _ in range(400):
        x0 = MEAN + VAR**0.5 * torch.randn(128, 2, generator=g, dtype=torch.float64)
        terms = O.consistency_loss(f, provider, x0, O.draw_indices(128, 5, generator=g), grid, sch, generator=g)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    x = torch.randn(256, 2, dtype=torch.float64, generator=g)
    for k in range(1, 6):
        xt = sch.alpha(grid[k]) * MEAN + sch.sigma(grid[k]) * x
        with torch.no_grad():
            out = f(xt, grid[k])
        chain = solvers.solve("ddim", teacher, xt, grid, k).x
        assert (out - chain).abs().max() < 2e-3, (k, (out - chain).abs().max())
        if k >= 3:  # and the solver's map is measurably not the exact flow
            assert (chain - flow(sch, xt, grid[k], grid[0], MEAN, VAR)).abs().max() > 1e-2


def test_index_schemes_same_pair_distribution_and_costs():
    N, B, draws = 10, 16, 4000
    g = torch.Generator().manual_seed(0)
    per = torch.cat([O.draw_indices(B, N, "per_sample", g) for _ in range(draws)])
    shared_batches = [O.draw_indices(B, N, "shared", g) for _ in range(draws)]
    shared = torch.cat(shared_batches)
    assert all(int(b.unique().numel()) == 1 for b in shared_batches[:50])
    # same marginal law of n: both uniform on 1..N (chi-square against the uniform law)
    for sample in (per, shared):
        counts = torch.bincount(sample, minlength=N + 1)[1:].double()
        expected = sample.numel() / N
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # shared draws are B-fold repeated, so scale the statistic by 1/B for it
        dof_limit = 27.9  # chi-square 99.9% quantile, 9 dof
        assert chi2 / (B if sample is shared else 1) < dof_limit
    cost = O.expected_direct_cd_cost(N, B)
    per_depth = torch.stack([b.max() for b in per.split(B)]).double().mean().item()
    shared_depth = torch.stack([b.max() for b in shared_batches]).double().mean().item()
    assert per_depth == pytest.approx(cost["per_sample_depth"], rel=0.02)
    assert shared_depth == pytest.approx(cost["shared_depth"], rel=0.05)
    big = O.expected_direct_cd_cost(100, 16)
    assert big["per_sample_depth"] == pytest.approx(100 * 16 / 17, rel=0.01)
    assert big["shared_depth"] == 50.5


def test_distances_and_weightings():
    a = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    b = torch.zeros(2, 2)
    assert torch.allclose(O.get_distance("l2")(a, b), torch.tensor([12.5, 1.0]))
    assert torch.allclose(O.get_distance("l1")(a, b), torch.tensor([3.5, 1.0]))
    ph = O.get_distance("pseudo_huber", c=0.5)(a, b)
    assert torch.allclose(ph, torch.sqrt(torch.tensor([12.5, 1.0]) + 0.25) - 0.5)
    with pytest.raises(ValueError, match="allowed"):
        O.get_distance("l3")
    sch = schedules.sdxl_schedule()
    grid = grids.skip(sch, 10)
    n = torch.tensor([1, 5, 10])
    assert torch.allclose(O.get_weighting("snr")(sch, grid, n), sch.alpha(grid[n]) ** 2 / sch.sigma(grid[n]) ** 2)
    kar = O.get_weighting("karras")(sch, grid, n)
    assert torch.allclose(kar, 1 / (sch.sigma_tilde(grid[n]) - sch.sigma_tilde(grid[n - 1])))


def test_cd_target_sees_same_dropout_as_student():
    sch, grid, teacher = _problem(5)

    class Dropper(Denoiser):
        def __init__(self):
            super().__init__(sch)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x, t, cond=None):
            return self.from_x0(x, t, self.drop(torch.ones_like(x)))

    f = ConsistencyFunction(Dropper(), LCMBoundary())
    seen = []

    def target_fn(x, t, cond=None):
        out = f(x, t, cond)
        seen.append(out)
        return out

    x_tn = torch.randn(64, 2, dtype=torch.float64)
    n = torch.full((64,), 3)
    provider = O.CDTarget(teacher, "ddim", grid, target_fn)
    terms = O.consistency_loss(f, provider, None, n, grid, sch, x_tn=x_tn)
    # same dropout pattern: the x0 part (c_out * dropped ones) is non-zero at the same places
    x_prev = solvers.get_solver("ddim").step(teacher, x_tn, grid[n], grid[n - 1])
    c_skip_prev = f.boundary.scalings(grid[n - 1])[0][:, None]
    target_mask = (seen[0] - c_skip_prev * x_prev).abs() > 1e-12
    student_mask = (terms["prediction"] - f.boundary.scalings(grid[n])[0][:, None] * x_tn).abs() > 1e-12
    assert torch.equal(student_mask, target_mask)
    # and the global RNG still advances between iterations (masks differ next time)
    terms2 = O.consistency_loss(f, provider, None, n, grid, sch, x_tn=x_tn)
    assert not torch.equal(terms2["prediction"], terms["prediction"])


# ----------------------------------------------------------------------------- k-step CD
class _Smooth(Denoiser):
    """A nonlinear x0 predictor (the target network's inner denoiser)."""

    def forward(self, x, t, cond=None):
        return self.from_x0(x, t, torch.tanh(x) * (1 + 1e-3 * t.reshape(-1, 1)))


class _GaussianX0(GaussianDenoiser):
    finite_at_zero_noise = False  # predicts x0: eps = (x - alpha x0) / sigma is 0/0 at the clean point


def _k_problem(B=9, seed=0, n_steps=10, offset=0):
    sch = schedules.sdxl_schedule(offset)
    grid = grids.skip(sch, n_steps)
    g = torch.Generator().manual_seed(seed)
    x_tn = torch.randn(B, 2, generator=g, dtype=torch.float64)
    n = torch.randint(1, n_steps + 1, (B,), generator=g)
    n[:3] = torch.tensor([1, n_steps, 2])
    f = ConsistencyFunction(_Smooth(sch), LCMBoundary())
    return sch, grid, _GaussianX0(sch, MEAN, VAR), x_tn, n, f


@pytest.mark.parametrize("solver", ["ddim", "heun", "euler_vp", "heun_vp"])
def test_k_step_target_k1_is_cd_bitwise(solver):
    sch, grid, teacher, x_tn, n, f = _k_problem()
    cd = O.CDTarget(teacher, solver, grid, f)(x_tn, n)
    for mask_mode in ("subset", "full"):
        k1 = O.make_target_provider("cd_k", teacher, solver, grid, target_fn=f, k=1, mask_mode=mask_mode)(x_tn, n)
        assert torch.equal(k1.value, cd.value)
        assert (k1.calls, k1.evals, k1.steps) == (cd.calls, cd.evals, cd.steps)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("solver", ["ddim", "euler_vp", "heun_vp"])
def test_k_step_target_large_k_is_direct_cd_bitwise(solver, offset):
    """k >= max n: the solver's endpoint itself (no target-network call), with Direct CD's cost."""
    sch, grid, teacher, x_tn, n, _ = _k_problem(offset=offset)
    calls = []

    def target_fn(x, t, cond=None):
        calls.append(1)
        return x

    for mask_mode in ("subset", "full"):
        direct = O.DirectCDTarget(teacher, solver, grid, mask_mode=mask_mode)(x_tn, n)
        for k in (int(n.max()), 10, 50):
            out = O.KStepTarget(teacher, solver, grid, target_fn, k, mask_mode=mask_mode)(x_tn, n)
            assert torch.equal(out.value, direct.value), (k, mask_mode)
            assert (out.calls, out.evals, out.steps) == (direct.calls, direct.evals, direct.steps)
    assert not calls


@pytest.mark.parametrize("solver", ["ddim", "heun_vp"])
def test_k_step_target_intermediate_k(solver):
    """1 < k < n: k solver steps (to t_m, m = max(n - k, 0)), then the target network at t_m; rows
    that reach t_0 keep the solver's state. Cost: depth min(k, max n), sum_b min(k, n_b) steps."""
    sch, grid, teacher, x_tn, n, f = _k_problem(B=12, seed=3)
    k = 3
    m = (n - k).clamp(min=0)
    reached = solvers.solve(solver, teacher, x_tn, grid, n, end_index=m).x
    expected = f(reached, grid[m])
    expected[m == 0] = reached[m == 0]
    per_step = solvers.get_solver(solver).evals_per_step
    for mask_mode in ("subset", "full"):
        out = O.KStepTarget(teacher, solver, grid, f, k, mask_mode=mask_mode)(x_tn, n)
        torch.testing.assert_close(out.value, expected, rtol=1e-13, atol=1e-13)
        assert out.steps == k and out.calls == k * per_step
        assert out.evals == per_step * (int(torch.minimum(n, torch.tensor(k)).sum()) if mask_mode == "subset" else 12 * k)
    # the boundary condition is imposed exactly: rows at t_0 keep the solver's state whatever target_fn does
    shifted = O.KStepTarget(teacher, solver, grid, lambda x, t, cond=None: x + 1.0, k)(x_tn, n).value
    assert torch.equal(shifted[m == 0], reached[m == 0]) and torch.equal(shifted[m > 0], reached[m > 0] + 1.0)
    # the knob moves the target between the two ends
    cd = O.CDTarget(teacher, solver, grid, f)(x_tn, n).value
    direct = O.DirectCDTarget(teacher, solver, grid)(x_tn, n).value
    deep = n > k
    assert (out.value[deep] - cd[deep]).abs().max() > 1e-3 and (out.value[deep] - direct[deep]).abs().max() > 1e-3


def test_k_step_target_in_the_loss_and_errors():
    sch, grid, teacher, x_tn, n, f = _k_problem()
    provider = O.make_target_provider("cd_k", teacher, "ddim", grid, target_fn=f, k=2)
    assert isinstance(provider, O.KStepTarget) and provider.method == "cd_k"
    terms = O.consistency_loss(f, provider, None, n, grid, sch, x_tn=x_tn)
    assert terms["target_steps"] == 2 and terms["target_evals"] == int(torch.minimum(n, torch.tensor(2)).sum())
    cd_terms = O.consistency_loss(f, O.CDTarget(teacher, "ddim", grid, f), None, n, grid, sch, x_tn=x_tn)
    k1_terms = O.consistency_loss(f, O.KStepTarget(teacher, "ddim", grid, f, 1), None, n, grid, sch, x_tn=x_tn)
    assert torch.equal(cd_terms["per_sample"], k1_terms["per_sample"])
    with pytest.raises(ValueError, match="needs k"):
        O.make_target_provider("cd_k", teacher, "ddim", grid, target_fn=f)
    with pytest.raises(ValueError, match="k=0"):
        O.make_target_provider("cd_k", teacher, "ddim", grid, target_fn=f, k=0)
    with pytest.raises(ValueError, match="only used by method='cd_k'"):
        O.make_target_provider("cd", teacher, "ddim", grid, target_fn=f, k=2)
    with pytest.raises(ValueError, match="needs a target_fn"):
        O.make_target_provider("cd_k", teacher, "ddim", grid, k=2)
    with pytest.raises(ValueError, match="allowed"):
        O.make_target_provider("cdk", teacher, "ddim", grid, target_fn=f, k=2)
