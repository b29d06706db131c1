"""The paper's protocol end to end on CPU (issue 10): the six paper configs (cd / direct_cd x ddim / euler_vp /
heun_vp, the paper's indexing) through training, the three references, sampling, evaluation and Table 1 on
the tiny SDXL, running **exactly** the command lines of docs/sdxl_protocol.md ("CPU smoke"), in one process.

``python -m M args`` lines run in-process (``runpy``, as ``python -m`` would, but without re-importing torch
22 times); other lines (mkdir, printf) run in bash. The tiny model is the session's ``tiny_sdxl_dir``
fixture, which lies where ``model.pretrained=tiny`` looks for it (``$ODECM_CACHE_DIR/tiny_sdxl_seed0``, the
session's cache folder: ``tests/conftest.py``).
"""
from __future__ import annotations

import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "sdxl_protocol.md"
PAPER_CONFIGS = ["cd_ddim", "cd_euler", "cd_heun", "direct_cd_ddim", "direct_cd_euler", "direct_cd_heun"]
SOLVER_OF = {"ddim": "ddim", "euler": "euler_vp", "heun": "heun_vp"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def smoke_lines() -> list[str]:
    text = DOC.read_text()
    blocks = re.findall(r"<!-- smoke: cpu -->\s*```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/sdxl_protocol.md lost its CPU smoke block"
    return [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]


def run_line(line: str, cwd: Path, monkeypatch) -> None:
    if not line.startswith("python -m "):
        subprocess.run(["bash", "-c", line], cwd=cwd, check=True)
        return
    argv = shlex.split(line)[2:]
    module, args = argv[0], argv[1:]
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as exc:  # run_main exits 2 on a bad input: the doc's command is wrong
        assert exc.code in (0, None), f"{line!r} exited with {exc.code}"


def test_doc_smoke_runs_the_six_paper_configs(tmp_path, tiny_sdxl_dir, monkeypatch):
    lines = smoke_lines()
    trained = [re.search(r"--config (\S+)", ln).group(1) for ln in lines if ln.startswith("python -m sdxl.train")]
    assert trained == PAPER_CONFIGS
    refs = [re.search(r"solver=(\S+)", ln).group(1) for ln in lines if ln.startswith("python -m sdxl.reference")]
    assert refs == ["ddim", "euler_vp", "heun_vp"]
    assert all("model.timestep_offset=1" in ln for ln in lines if ln.startswith("python -m sdxl.reference"))

    from odecm.runs import cache_root

    assert tiny_sdxl_dir == cache_root() / "tiny_sdxl_seed0"  # model.pretrained=tiny finds it, built once
    monkeypatch.chdir(tmp_path)
    for line in lines:
        run_line(line, tmp_path, monkeypatch)

    smoke = tmp_path / "smoke"
    for name in PAPER_CONFIGS:
        method, solver = name.rsplit("_", 1)
        run = json.loads((smoke / "runs" / name / "config.json").read_text())
        # the paper's solvers and indexing went through training ...
        assert run["distill"]["solver"] == SOLVER_OF[solver] and run["distill"]["method"] == method
        assert run["model"]["timestep_offset"] == 1 and run["distill"]["grid_size"] == 10
        # ... sampling (each student in its own indexing, against its own solver's reference) ...
        sman = json.loads((smoke / "samples" / name / "manifest.json").read_text())
        assert sman["timestep_offset"] == 1
        assert sman["timesteps"] == {"1": [1000], "2": [1000, 500], "4": [1000, 750, 500, 250]}
        assert sman["labels"] == {"method": method, "solver": SOLVER_OF[solver]}
        assert Path(sman["reference"]).name == SOLVER_OF[solver]
        # ... and evaluation
        m = json.loads((smoke / "samples" / name / "eval" / "metrics.json").read_text())
        assert m["teacher"]["solver"] == SOLVER_OF[solver] and m["teacher"]["timestep_offset"] == 1
        assert m["fd_protocol"]["name"] == "paper" and set(m["k"]) == {"1", "2", "4"}
        assert all(v["ode_error_latent"] > 0 and v["num_samples"] == 2 for v in m["k"].values())
    for s in ("ddim", "euler_vp", "heun_vp"):
        rman = json.loads((smoke / "refs" / s / "manifest.json").read_text())
        assert rman["complete"] and rman["key"]["solver"] == s and rman["key"]["timestep_offset"] == 1
    table = json.loads((smoke / "table" / "table.json").read_text())
    rows = {r["row"]: r for r in table["rows"]}
    for row in ("CM DDIM", "CM Euler", "CM Heun", "Direct CM DDIM", "Direct CM Euler", "Direct CM Heun",
                "Teacher DDIM (N=10)", "Teacher Euler (N=10)", "Teacher Heun (N=10)"):
        assert rows[row]["status"] == "ok", row
    assert table["warnings"] == [] and table["settings"]["timestep indexing"] == 1
    # one student differs from another: the runs really were separate
    assert rows["CM DDIM"]["k"]["1"]["ode_error_latent"] != rows["Direct CM Heun"]["k"]["1"]["ode_error_latent"]
