"""The installable package: a wheel carries the shipped configs and the console scripts, named
configs resolve from the installed package, and nothing else provides the top-level packages."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from studies import console

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("odecm-*.whl")
    return whl


def test_wheel_carries_every_shipped_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/configs/*.yaml"))
    assert shipped and all(s in names for s in shipped), sorted(set(shipped) - names)


def test_wheel_console_scripts_match_the_dispatcher(wheel):
    z = zipfile.ZipFile(wheel)
    (ep,) = [n for n in z.namelist() if n.endswith("entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(z.read(ep).decode())
    scripts = dict(parser["console_scripts"])
    assert set(scripts) == set(console.SCRIPTS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == "studies.console" and callable(getattr(console, func)), name


def test_named_configs_resolve_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import sdxl.train_config as t; c = t.load_train_config('tiny_cpu'); "
            "print(t.CONFIG_DIR); print(c.distill.train_steps)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    config_dir, steps = out.stdout.split()
    assert Path(config_dir).is_relative_to(target) and int(steps) >= 1


@pytest.mark.parametrize("name", ["odecm", "toys", "sdxl", "studies"])
def test_top_level_packages_belong_to_odecm_only(name):
    providers = metadata.packages_distributions().get(name, [])
    # (an editable install can list odecm twice: its dist-info and the source tree's egg-info)
    assert set(providers) == {"odecm"}, f"{name!r} is provided by {providers}"
    spec_origin = Path(__import__(name).__file__).resolve()
    assert spec_origin.is_relative_to(ROOT), spec_origin


def test_console_script_runs_and_reports_errors_in_one_line(tmp_path):
    code = "import sys; from studies.console import score_error; sys.argv = ['odecm-score-error', '--set', 'bogus=1']; score_error()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: bogus: unknown key"), out.stderr
