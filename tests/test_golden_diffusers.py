"""Golden test: odecm's DDIM / Euler / Heun on SDXL's discrete schedule against diffusers' schedulers.

The same analytic eps-model (a smooth fixed function of (x, t)) drives both. diffusers' DDIM state is
``x`` (VP); its Euler / Heun state is ``x / alpha`` ("VE") started at ``noise * init_noise_sigma`` with
``init_noise_sigma = sqrt(sigma_max^2 + 1) = 1 / alpha(t_max)`` for leading spacing, so
``x_vp = x_ve * alpha(t)`` and the VP start is the noise itself. Grids: ``odecm.grids.leading`` with
``final="first"`` for DDIM (``set_alpha_to_one=False`` ends at alphas_cumprod[0]) and ``"clean"`` for
Euler / Heun (they end at sigma = 0). Compared: every model call (timestep and input) and every state
along the trajectory, to 1e-5 relative to the state's largest entry.
"""
import os

import numpy as np

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

from odecm.denoisers import EpsDenoiser  # noqa: E402
from odecm.grids import leading  # noqa: E402
from odecm.schedules import sdxl_schedule  # noqa: E402
from odecm.solvers import solve  # noqa: E402

SDXL_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False), "first"),
    "euler": (diffusers.EulerDiscreteScheduler, {}, "clean"),
    "heun": (diffusers.HeunDiscreteScheduler, {}, "clean"),
}
RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class RecordingEpsModel:
    """eps(x, t) = tanh(0.3 x + 0.001 t) + 0.1 sin(0.7 x - 0.002 t) + 0.05 x^2 / (1 + x^2); records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype)
        t_b = t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t
        self.calls.append((t.reshape(-1)[0].item(), x.detach().clone()))
        return torch.tanh(0.3 * x + 0.001 * t_b) + 0.1 * torch.sin(0.7 * x - 0.002 * t_b) + 0.05 * x**2 / (1 + x**2)


def _noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def run_diffusers(name, num_steps, noise):
    cls, extra, _ = SCHEDULERS[name]
    sched = cls(**SDXL_CONFIG, **extra)
    sched.set_timesteps(num_steps)
    model = RecordingEpsModel()
    x = noise * sched.init_noise_sigma
    vp_alpha = lambda sigma: (1.0 + sigma**2) ** -0.5  # noqa: E731
    states = [x.double() if name == "ddim" else (x * vp_alpha(sched.sigmas[0])).double()]
    n_calls = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
        if name == "ddim":
            states.append(x.double())
        elif name == "euler":
            states.append((x * vp_alpha(sched.sigmas[i + 1])).double())
        elif i % 2 == 1 or i == n_calls - 1:  # heun: a step is complete after its corrector (or the final Euler)
            states.append((x * vp_alpha(sched.sigmas[i + 1])).double())
    return states, model.calls, sched


def run_odecm(name, num_steps, noise, dtype, timestep_offset=0):
    """``timestep_offset=1`` (paper's indexing): the model receives t - 1, diffusers' timestep."""
    sch = sdxl_schedule(timestep_offset)
    grid = leading(sch, num_steps, steps_offset=1, final=SCHEDULERS[name][2])
    model = RecordingEpsModel()
    eps_model = model if timestep_offset == 0 else (lambda x, t, cond=None: model(x, t - timestep_offset, cond))
    res = solve(name, EpsDenoiser(eps_model, sch), noise.to(dtype), grid, num_steps, return_trajectory=True)
    return [s.double() for s in res.trajectory], model.calls, grid - timestep_offset


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("num_steps", [4, 25, 100])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_solver_matches_diffusers(name, num_steps, dtype):
    noise = _noise()
    ref_states, ref_calls, sched = run_diffusers(name, num_steps, noise)
    states, calls, grid = run_odecm(name, num_steps, noise, dtype)
    # the grid is diffusers' timestep sequence (reversed), plus the end point
    inner = torch.unique(sched.timesteps.double())
    torch.testing.assert_close(grid[1:], inner, rtol=0, atol=0)
    # same model calls: same timesteps, same inputs
    assert len(calls) == len(ref_calls)
    for (t, x_in), (t_ref, x_ref) in zip(calls, ref_calls):
        assert t == t_ref
        assert _rel_err(x_in.double(), x_ref.double()) < RTOL
    # same states along the trajectory, and the same endpoint
    assert len(states) == len(ref_states) == num_steps + 1
    errs = [_rel_err(s, r) for s, r in zip(states, ref_states)]
    assert max(errs) < RTOL, errs
    assert ref_states[-1].abs().max() > 0.1  # a non-trivial endpoint


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_paper_indexing_gives_the_same_trajectory(name):
    """On the offset-1 schedule the leading grid is diffusers' timesteps + 1 (same noise levels)."""
    noise = _noise()
    ref_states, ref_calls, _ = run_diffusers(name, 25, noise)
    states, calls, _ = run_odecm(name, 25, noise, torch.float64, timestep_offset=1)
    assert [t for t, _ in calls] == [t for t, _ in ref_calls]
    assert max(_rel_err(s, r) for s, r in zip(states, ref_states)) < RTOL


@pytest.mark.parametrize("timestep_offset", [0, 1])
@pytest.mark.parametrize("num_steps", [4, 50])
def test_ddim_matches_diffusers_in_float64(num_steps, timestep_offset):
    """With diffusers' exact tables, odecm's DDIM is diffusers' DDIM to 1e-12 in float64: diffusers'
    ``DDIMScheduler.step`` run with its ``alphas_cumprod`` cast to float64 (so its arithmetic is
    float64), and a numpy float64 re-derivation of that step from diffusers' tables."""
    cls, extra, final = SCHEDULERS["ddim"]
    sched = cls(**SDXL_CONFIG, **extra)
    ac = sched.alphas_cumprod.double()
    sched.alphas_cumprod, sched.final_alpha_cumprod = ac, sched.final_alpha_cumprod.double()
    sched.set_timesteps(num_steps)
    noise = _noise().double()
    model = RecordingEpsModel()
    x, ref_states = noise, [noise]
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
        ref_states.append(x)
    # numpy re-derivation: x' = sqrt(a') (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps
    a_np = ac.numpy()
    y = noise.numpy()
    steps = sched.timesteps.tolist()
    for i, t in enumerate(steps):
        a, a_prev = a_np[t], (a_np[steps[i + 1]] if i + 1 < len(steps) else a_np[0])
        eps = model(torch.from_numpy(y), t).numpy()
        y = np.sqrt(a_prev) * (y - np.sqrt(1 - a) * eps) / np.sqrt(a) + np.sqrt(1 - a_prev) * eps
    states, _, _ = run_odecm("ddim", num_steps, noise, torch.float64, timestep_offset)
    assert len(states) == len(ref_states)
    for s, r in zip(states, ref_states):
        assert _rel_err(s, r.double()) < 1e-12
    assert _rel_err(states[-1], torch.from_numpy(y)) < 1e-12
    assert ref_states[-1].abs().max() > 0.1
