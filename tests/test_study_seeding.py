"""studies.seeding: every source of randomness varies with the seed unless it is held fixed; the studies use it."""
from __future__ import annotations

import pytest
import torch

from studies.seeding import SOURCES, SeedConfig, derive_seed

pytestmark = pytest.mark.usefixtures("single_thread")


def test_each_source_changes_with_the_seed_and_sources_are_distinct():
    cfg = SeedConfig()
    a, b = cfg.streams(0), cfg.streams(1)
    assert set(a) == set(SOURCES)
    for source in SOURCES:
        assert a[source] != b[source], source
    assert len(set(a.values())) == len(SOURCES)  # independent streams within one seed
    assert derive_seed(0, "pool") == a["pool"] and 0 <= a["pool"] < 2**31


def test_held_sources_are_fixed_and_the_rest_still_vary():
    held = ["pool", "eval_noise", "reference", "teacher"]
    cfg = SeedConfig(hold_fixed=held, fixed_seed=5)
    a, b = cfg.streams(0), cfg.streams(1)
    for source in SOURCES:
        assert (a[source] == b[source]) == (source in held), source
    assert a["pool"] == derive_seed(5, "pool")
    assert cfg.varied() == ["init", "batch"]
    with pytest.raises(ValueError, match="listed twice"):
        SeedConfig(hold_fixed=["pool", "pool"])
    with pytest.raises(ValueError):
        SeedConfig(hold_fixed=["weather"])


def _score_world(tmp_path, monkeypatch, hold):
    from studies.score_error import ScoreErrorConfig
    from studies.score_error_world import World

    monkeypatch.setenv("ODECM_CACHE_DIR", str(tmp_path))
    cfg = ScoreErrorConfig.model_validate({
        "teachers": [{"label": "learned(3)", "kind": "learned", "budget": 3}], "solvers": ["ddim"], "seeds": [0, 1],
        "train": {"pool_size": 64}, "eval": {"num_samples": 20, "score_error_samples": 16},
        "seeding": {"hold_fixed": hold}})
    return cfg, World(cfg)


@pytest.mark.parametrize("hold", [[], ["pool", "eval_noise", "reference", "teacher"]])
def test_score_error_sources_follow_the_seeding(tmp_path, monkeypatch, hold):
    """Evaluation noise, reference, pool and the learned teacher's weights differ between seeds, unless held."""
    cfg, W = _score_world(tmp_path, monkeypatch, hold)
    spec = cfg.teachers[0]
    w0, w1 = W.teacher(spec, 0), W.teacher(spec, 1)
    s0, s1 = W.seed_data(0), W.seed_data(1)
    same = lambda a, b: torch.equal(a, b)  # noqa: E731
    assert same(s0.x_T, s1.x_T) == ("eval_noise" in hold)
    assert same(s0.reference, s1.reference) == ("reference" in hold)
    assert same(w0.pools["ddim"].x0, w1.pools["ddim"].x0) == ("pool" in hold)
    w_a = next(iter(w0.denoiser.net.parameters()))
    w_b = next(iter(w1.denoiser.net.parameters()))
    assert same(w_a, w_b) == ("teacher" in hold)
    # the student's initialisation and batch seeds always differ between seeds here
    assert cfg.seeding.seed_for("init", 0) != cfg.seeding.seed_for("init", 1)
    assert cfg.seeding.seed_for("batch", 0) != cfg.seeding.seed_for("batch", 1)


def test_cells_eval_sets_and_pools_follow_the_seeding():
    from studies import cells
    from toys.ensemble import TrainConfig

    world = cells.build_world(cells.DataConfig(), cells.WorldConfig(grid_size=10))
    ev = cells.EvalConfig(num_samples=16, exact_ode=False)
    for hold in ([], ["eval_noise", "reference", "pool"]):
        sc = SeedConfig(hold_fixed=hold)
        e0, e1 = (cells.make_eval_set(world, ev, sc.seed_for("eval_noise", s), sc.seed_for("reference", s))
                  for s in (0, 1))
        assert torch.equal(e0.x_T, e1.x_T) == bool(hold)
        assert torch.equal(e0.reference, e1.reference) == bool(hold)
        pools = cells.build_pools(world, TrainConfig(pool_size=32), sc, [0, 1])
        assert (pools[0] is pools[1]) == bool(hold)
        assert torch.equal(pools[0].x0, pools[1].x0) == bool(hold)
