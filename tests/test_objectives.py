"""CD and Direct CD objectives on Gaussian data, where every map is known in closed form."""
import math

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
