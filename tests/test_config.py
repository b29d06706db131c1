"""Config validation: unknown keys and bad values name the key and what is allowed."""
import json

import pytest

from odecm.config import ConfigError, DistillConfig, load_config, parse_overrides, save_config


def test_defaults_run_and_overrides_apply(tmp_path):
    cfg = load_config(DistillConfig)
    assert cfg.method == "cd" and cfg.grid_size == 100 and cfg.target.rate == 0.0
    path = tmp_path / "run.yaml"
    path.write_text("method: direct_cd\nsolver: heun\noptim:\n  lr: 0.001\n")
    cfg = load_config(DistillConfig, path, ["grid_size=50", "target.policy=ema", "target.ema_rate=0.95"])
    assert (cfg.method, cfg.solver, cfg.grid_size, cfg.optim.lr, cfg.target.rate) == ("direct_cd", "heun", 50, 1e-3, 0.95)
    save_config(cfg, tmp_path / "resolved.json")
    again = load_config(DistillConfig, tmp_path / "resolved.json")
    assert again == cfg
    assert json.loads((tmp_path / "resolved.json").read_text())["target"]["ema_rate"] == 0.95


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=true", "e=null", "f=x"]) == {
        "a": {"b": 1}, "c": [1, 2], "d": True, "e": None, "f": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("override, key, allowed", [
    ("method=directcd", "method", "'cd', 'direct_cd'"),
    ("solver=rk4", "solver", "'ddim', 'euler', 'heun'"),
    ("optim.name=lion", "optim.name", "adamw"),
    ("bogus=1", "bogus", "allowed keys"),
    ("target.rate=0.5", "target.rate", "ema_rate"),
])
def test_bad_values_name_the_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(DistillConfig, overrides=[override])
    msg = str(err.value)
    assert key in msg and allowed in msg


def test_range_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"grid_size.*greater than or equal to 1"):
        load_config(DistillConfig, overrides=["grid_size=0"])
    with pytest.raises(ConfigError, match=r"target.ema_rate"):
        load_config(DistillConfig, overrides=["target.policy=ema", "target.ema_rate=1.5"])
    with pytest.raises(ConfigError, match="stopgrad"):
        load_config(DistillConfig, overrides=["target.ema_rate=0.5"])
