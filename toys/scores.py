"""Teacher score variants on a Gaussian mixture: each is an ``odecm`` Denoiser over a schedule.

* ``exact``            the Bayes-optimal denoiser of the data mixture p (no score error);
* ``wrong_gmm``        the *exact* denoiser of a perturbed mixture q_delta (a conservative, smooth
                       score error whose ODE samples q_delta exactly);
* ``nonconservative``  exact eps plus a divergence-free rotational field of size delta
                       (a score error that is not the score of any density);
* ``learned``          a small MLP eps-predictor trained by denoising score matching (realistic
                       error, controlled by the training budget), cached on disk.

``score_error`` measures any teacher against the exact one in eps units
(``||eps_T - eps*||^2 = sigma^2 ||score_T - score*||^2``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from odecm.atomic import atomic_path, write_json_atomic
from odecm.denoisers import Denoiser
from odecm.schedules import DiscreteSchedule, NoiseSchedule

from .gmm import ExactGMMDenoiser, GaussianMixture, limit_threads as _threads

Tensor = torch.Tensor

__all__ = [
    "exact",
    "perturbed_gmm",
    "wrong_gmm",
    "NonconservativeDenoiser",
    "nonconservative",
    "rotation_generator",
    "TimeMLP",
    "LearnedDenoiser",
    "learned",
    "TEACHERS",
    "make_teacher",
    "ScoreError",
    "score_error",
    "default_t_grid",
]


# ------------------------------------------------------------------------------ exact / wrong_gmm
def exact(gmm: GaussianMixture, schedule: NoiseSchedule) -> ExactGMMDenoiser:
    """The exact denoiser ``E[x0 | x_t]`` of ``gmm`` under ``schedule``."""
    return gmm.exact_denoiser(schedule)


def perturbed_gmm(gmm: GaussianMixture, delta: float, seed: int = 0) -> GaussianMixture:
    """``q_delta``: means ``m_k + delta * spacing * u_k`` with fixed random unit vectors ``u_k``
    (drawn from ``seed``) and ``spacing = gmm.mode_spacing()``; covariances ``(1 + delta)^2 C_k``
    (every width scaled by ``1 + delta``); weights unchanged. ``delta = 0`` returns a bit-identical copy."""
    if delta < 0:
        raise ValueError(f"delta={delta}; allowed: delta >= 0")
    g = torch.Generator().manual_seed(int(seed))
    u = torch.randn(gmm.num_components, gmm.dim, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    return gmm.transformed(mean_shift=float(delta) * gmm.mode_spacing() * u, var_scale=(1.0 + float(delta)) ** 2)


def wrong_gmm(gmm: GaussianMixture, schedule: NoiseSchedule, delta: float = 0.1, seed: int = 0) -> ExactGMMDenoiser:
    """The exact denoiser of ``q_delta = perturbed_gmm(gmm, delta, seed)``; ``.gmm`` is ``q_delta``
    (sample it with ``.gmm.sample_p0`` to measure what a perfect ODE solve of this teacher gives)."""
    return perturbed_gmm(gmm, delta, seed).exact_denoiser(schedule)


# ------------------------------------------------------------------------------ nonconservative
def rotation_generator(dim: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Skew-symmetric ``J`` rotating the coordinate pairs (0,1), (2,3), ...: ``J[2i, 2i+1] = -1``,
    ``J[2i+1, 2i] = 1`` (a trailing odd coordinate is left alone). ``J^T = -J``, trace 0."""
    J = torch.zeros(dim, dim, dtype=dtype)
    for i in range(0, dim - 1, 2):
        J[i, i + 1], J[i + 1, i] = -1.0, 1.0
    return J


class NonconservativeDenoiser(Denoiser):
    """Exact eps plus a rotational field:

        eps_hat(x, t) = eps*(x, t) + delta * J (x - alpha c) / sqrt(alpha^2 v_data + sigma^2),

    with ``J`` = ``rotation_generator(d)``, ``c`` the data mean and ``v_data = gmm.data_std()^2``.
    The added field has divergence trace(J) = 0 and curl 2 J != 0, so the teacher's "score"
    ``-eps_hat / sigma`` is not a gradient; the normalisation keeps the perturbation's size ~delta
    (eps units, per coordinate) at every noise level. ``x0_hat`` follows from ``eps_hat``."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule, delta: float = 0.1):
        super().__init__(schedule)
        self.gmm, self.delta = gmm, float(delta)
        self.exact = gmm.exact_denoiser(schedule)
        self._J = rotation_generator(gmm.dim)
        self._center = gmm.mean()
        self._v_data = gmm.data_std() ** 2

    def rotational_eps(self, x: Tensor, t: Tensor) -> Tensor:
        """The added field ``J (x - alpha c) / sqrt(alpha^2 v_data + sigma^2)`` (without delta)."""
        a, s = self.coefficients(x, t)
        J = self._J.to(device=x.device, dtype=x.dtype)
        c = self._center.to(device=x.device, dtype=x.dtype)
        return ((x - a * c) @ J.T) / torch.sqrt(a * a * self._v_data + s * s)

    def forward(self, x, t, cond=None):
        pred = self.exact(x, t, cond)
        if self.delta == 0.0:
            return pred
        return self.from_eps(x, t, pred.eps + self.delta * self.rotational_eps(x, t))


def nonconservative(gmm: GaussianMixture, schedule: NoiseSchedule, delta: float = 0.1) -> NonconservativeDenoiser:
    return NonconservativeDenoiser(gmm, schedule, delta)


# ------------------------------------------------------------------------------ learned
class TimeMLP(nn.Module):
    """``net(x_in, c_noise) -> out``: an MLP on ``[x_in, sin/cos(freqs * c_noise)]`` (SiLU)."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, n_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freqs, dtype=torch.float32) * 0.5, persistent=False)
        layers: list[nn.Module] = []
        fan_in = dim + 2 * n_freqs
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        ang = c_noise[:, None] * self.freqs.to(x.dtype)
        return self.body(torch.cat([x, torch.sin(ang), torch.cos(ang)], -1))


class LearnedDenoiser(Denoiser):
    """An MLP teacher with EDM-style input scaling:

        c_in = 1 / sqrt(alpha^2 v_data + sigma^2),   c_noise = log(sigma / alpha) / 4,
        eps_hat = net(c_in x, c_noise)              (predict="eps"), or
        x0_hat  = net(c_in x, c_noise)              (predict="x0").

    ``loaded_from_cache`` tells whether the weights came from disk; ``config`` is the hashed config."""

    finite_at_zero_noise = False  # c_noise = log(sigma / alpha) / 4 diverges at sigma = 0; see odecm.denoisers.Denoiser

    def __init__(self, net: TimeMLP, schedule: NoiseSchedule, v_data: float, predict: str, config: dict | None = None):
        super().__init__(schedule)
        if predict not in ("eps", "x0"):
            raise ValueError(f"predict={predict!r}; allowed: 'eps', 'x0'")
        self.net, self.v_data, self.predict = net, float(v_data), predict
        self.config = config or {}
        self.loaded_from_cache = False
        self.cache_path: Path | None = None
        self.train_steps_run = 0

    def forward(self, x, t, cond=None):
        a, s = self.coefficients(x, t)
        c_in = torch.rsqrt(a * a * self.v_data + s * s)
        c_noise = torch.log(self.schedule.sigma_tilde(t.to(torch.float64))).to(x.dtype).reshape(-1) / 4.0
        c_noise = c_noise.expand(x.shape[0]) if c_noise.numel() == 1 else c_noise
        out = self.net((c_in * x).to(torch.float32), c_noise.to(torch.float32)).to(x.dtype)
        return self.from_eps(x, t, out) if self.predict == "eps" else self.from_x0(x, t, out)


def _schedule_fingerprint(schedule: NoiseSchedule) -> dict:
    probe = torch.linspace(0.0, 1.0, 33, dtype=torch.float64) * (schedule.t_max - schedule.t_min) + schedule.t_min
    s = schedule.sigma_tilde(probe)
    return {"class": type(schedule).__name__, "sigma_tilde_probe": [float(f"{v:.10e}") for v in s.tolist()]}


def _gmm_fingerprint(gmm: GaussianMixture) -> str:
    h = hashlib.sha256()
    for tensor in (gmm.weights, gmm.means, gmm.covs):
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sample_train_times(schedule: NoiseSchedule, n: int, generator: torch.Generator) -> Tensor:
    """DSM training times: uniform integer timesteps for ``DiscreteSchedule`` (as SDXL was trained);
    otherwise log-uniform in ``sigma_tilde`` over ``[s(t_min), s(t_max)]``."""
    if isinstance(schedule, DiscreteSchedule):
        return torch.randint(int(schedule.t_min), int(schedule.t_max) + 1, (n,), generator=generator).to(torch.float64)
    lo = math.log(float(schedule.sigma_tilde(torch.tensor(schedule.t_min, dtype=torch.float64))))
    hi = math.log(float(schedule.sigma_tilde(torch.tensor(schedule.t_max, dtype=torch.float64))))
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return schedule.t_from_sigma_tilde(torch.exp(lo + (hi - lo) * u))


def default_cache_dir() -> Path:
    """``<odecm cache>/toy_teachers`` (``odecm.runs.cache_root()``: ``$ODECM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``)."""
    from odecm.runs import cache_root

    return cache_root() / "toy_teachers"


def _train(den, gmm, schedule, opt, sched, budget, batch_size, predict, v_data, gen) -> None:
    for _ in range(int(budget)):
        t = sample_train_times(schedule, batch_size, gen)
        x_t, _, x0, eps = gmm.sample_pt(batch_size, t, schedule, gen, dtype=torch.float32, device="cpu", return_x0=True)
        pred = den(x_t, t.to(torch.float32))
        if predict == "eps":
            loss = ((pred.eps - eps) ** 2).mean()
        else:
            a, s = den.coefficients(x_t, t)
            snr = (a / s) ** 2
            loss = ((snr / (1.0 + snr * v_data)) * (pred.x0 - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def learned(
    gmm: GaussianMixture,
    schedule: NoiseSchedule,
    budget: int = 2000,
    seed: int = 0,
    width: int = 64,
    depth: int = 3,
    cache_dir: str | Path | None = None,
    predict: str = "eps",
    batch_size: int = 256,
    lr: float = 2e-3,
    use_cache: bool = True,
) -> LearnedDenoiser:
    """A DSM-trained MLP teacher (deterministic given the config; CPU, float32).

    Training: ``budget`` Adam steps (lr cosine-decayed to 0), batches ``x0 ~ gmm``, t from
    ``sample_train_times``, loss ``E ||eps_hat - eps||^2`` (``predict="eps"``) or
    ``E w(t) ||x0_hat - x0||^2`` with ``w = SNR / (1 + SNR v_data)`` (``predict="x0"``, EDM-like). ``budget=0`` gives the untrained network.
    Cached under ``cache_dir`` (default ``default_cache_dir()``: ``<odecm cache>/toy_teachers``) as
    ``<hash>.safetensors`` + ``<hash>.json``, the hash taken over the full config (mixture, schedule,
    budget, seed, width, depth, predict, batch, lr).
    """
    from safetensors.torch import load_file, save_file

    config = {
        "version": 1,
        "gmm": _gmm_fingerprint(gmm),
        "dim": gmm.dim,
        "schedule": _schedule_fingerprint(schedule),
        "budget": int(budget),
        "seed": int(seed),
        "width": int(width),
        "depth": int(depth),
        "predict": predict,
        "batch_size": int(batch_size),
        "lr": float(lr),
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    w_path, c_path = cache / f"{key}.safetensors", cache / f"{key}.json"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = TimeMLP(gmm.dim, width, depth)
    v_data = gmm.data_std() ** 2
    den = LearnedDenoiser(net, schedule, v_data, predict, config)
    den.cache_path = w_path
    if use_cache and w_path.exists() and c_path.exists():
        net.load_state_dict(load_file(str(w_path)))
        den.loaded_from_cache = True
        return den.eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(int(seed) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, budget) / max(budget, 1))))
    net.train()
    with _threads(1):
        _train(den, gmm, schedule, opt, sched, budget, batch_size, predict, v_data, gen)
    den.train_steps_run = int(budget)
    net.eval()
    if use_cache:  # private temporary names (concurrent writers never mix); the JSON, written last, marks it done
        with atomic_path(w_path) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        write_json_atomic(c_path, config, indent=1)
    return den.requires_grad_(False)


# ------------------------------------------------------------------------------ registry
TEACHERS: dict[str, Callable[..., Denoiser]] = {
    "exact": exact,
    "wrong_gmm": wrong_gmm,
    "nonconservative": nonconservative,
    "learned": learned,
}


def make_teacher(kind: str, gmm: GaussianMixture, schedule: NoiseSchedule, **kw) -> Denoiser:
    """Teacher by kind: ``exact`` (no kw), ``wrong_gmm`` (delta, seed), ``nonconservative`` (delta),
    ``learned`` (budget, seed, width, depth, cache_dir, predict, batch_size, lr, use_cache)."""
    if kind not in TEACHERS:
        raise ValueError(f"teacher kind={kind!r} is unknown; allowed: {sorted(TEACHERS)}")
    import inspect

    allowed = [p for p in inspect.signature(TEACHERS[kind]).parameters if p not in ("gmm", "schedule")]
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise ValueError(f"unknown keys {bad} for teacher kind={kind!r}; allowed: {allowed}")
    return TEACHERS[kind](gmm, schedule, **kw)


# ------------------------------------------------------------------------------ score error
def default_t_grid(schedule: NoiseSchedule, n_t: int = 32) -> Tensor:
    """``n_t`` times: for ``DiscreteSchedule`` evenly spaced integer timesteps over [t_min, t_max];
    otherwise evenly spaced in ``log sigma_tilde`` between ``s(t_min)`` and ``s(t_max)`` (float64)."""
    if isinstance(schedule, DiscreteSchedule):
        return torch.linspace(schedule.t_min, schedule.t_max, n_t, dtype=torch.float64).round()
    lo = math.log(float(schedule.sigma_tilde(torch.tensor(schedule.t_min, dtype=torch.float64))))
    hi = math.log(float(schedule.sigma_tilde(torch.tensor(schedule.t_max, dtype=torch.float64))))
    return schedule.t_from_sigma_tilde(torch.exp(torch.linspace(lo, hi, n_t, dtype=torch.float64)))


@dataclass
class ScoreError:
    """``mean = sum_i weights_i per_t_i`` with ``per_t_i = E_{x ~ p_{t_i}} ||eps_T - eps*||^2 / d``."""

    mean: float
    per_t: Tensor
    t: Tensor
    weights: Tensor
    extras: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "per_t": self.per_t.tolist(), "t": self.t.tolist(), "weights": self.weights.tolist()}


def score_error(
    teacher: Denoiser,
    gmm: GaussianMixture,
    schedule: NoiseSchedule,
    n: int = 4096,
    t_grid: Tensor | None = None,
    weighting: str | Tensor = "uniform",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> ScoreError:
    """Teacher eps error against the exact mixture, in eps units (``= sigma^2 ||score error||^2``).

    For each ``t`` in ``t_grid`` (default ``default_t_grid(schedule)``: log-sigma-uniform or evenly
    spaced discrete timesteps), draws ``n`` points ``x ~ p_t`` (the true noisy marginal) and
    averages ``||eps_T(x, t) - eps*(x, t)||^2 / d``. The mean over t uses ``weighting``:
    ``"uniform"`` (equal weight per grid time, i.e. uniform in log sigma for continuous schedules),
    ``"snr"`` (weights proportional to ``min(SNR(t), 1)``: down-weights high noise), or an explicit
    tensor of per-t weights (normalised to sum 1). Points are drawn from the same ``generator`` stream.
    """
    t_grid = default_t_grid(schedule) if t_grid is None else torch.as_tensor(t_grid, dtype=torch.float64).reshape(-1)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    exact_den = gmm.exact_denoiser(schedule)
    per_t = []
    with _threads(1) if n <= 16384 else contextlib.nullcontext():
        for t in t_grid.tolist():
            x, _ = gmm.sample_pt(n, t, schedule, gen, dtype=dtype, device="cpu")
            tt = torch.full((n,), t, dtype=dtype)
            with torch.no_grad():
                e_teacher = teacher(x, tt).eps
                e_exact = exact_den(x.to(torch.float64), tt.to(torch.float64)).eps
            per_t.append(float(((e_teacher.to(torch.float64) - e_exact) ** 2).mean()))
    per_t_tensor = torch.tensor(per_t, dtype=torch.float64)
    if isinstance(weighting, str):
        if weighting == "uniform":
            w = torch.ones_like(per_t_tensor)
        elif weighting == "snr":
            w = torch.clamp(schedule.snr(t_grid), max=1.0)
        else:
            raise ValueError(f"weighting={weighting!r}; allowed: 'uniform', 'snr', or a tensor of per-t weights")
    else:
        w = torch.as_tensor(weighting, dtype=torch.float64).reshape(-1)
        if w.shape != per_t_tensor.shape:
            raise ValueError(f"weighting has {w.numel()} entries, t_grid has {per_t_tensor.numel()}")
    w = w / w.sum()
    return ScoreError(mean=float((w * per_t_tensor).sum()), per_t=per_t_tensor, t=t_grid, weights=w)
