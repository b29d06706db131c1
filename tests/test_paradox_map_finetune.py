"""studies.paradox_map's ``direct_first`` axis (CD as a fine-tuner: P Direct CD steps, then CD, against Direct CD
of the same budget): its config checks, its --quick version, and that its P = 0 cells are the ordinary CD vs
Direct CD cells."""
from __future__ import annotations

import json

import pytest

from studies import paradox_map
from studies import paradox_map_engine as engine
from studies import paradox_map_report as report
from studies.common import ConfigError
from studies.paradox_map import ParadoxMapConfig

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "studies/configs/paradox_map_finetune.yaml"
SMALL = ["eval.num_samples=120", "eval.max_points=120", "train.pool_size=1024"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize("override, message", [
    ("rows={name: direct_first, values: [-1, 0]}", r"direct_first: bad values \[-1\]; allowed: integers >= 0"),
    ("rows={name: direct_first, values: [0, 0.5]}", r"direct_first: bad values \[0.5\]"),
    ("rows={name: direct_first, values: [0, 2000]}",
     r"direct_first: bad values \[2000\]; allowed: integers 0 <= P < train.train_steps=2000"),
    ("rows={name: direct_first, values: [0, 500]}; k=4", r"direct_first: .*allowed with it: k='all' and no k axis"),
    ("rows={name: direct_first, values: [0, 500]}; cols={name: k, values: [1, all]}", r"no k axis"),
    ("rows={name: direct_first, values: [0, 500]}; cols={name: train_steps, values: [1000, 2000]}",
     r"direct_first: the total budget is train.train_steps; allowed axes beside it"),
    ("train.direct_first_steps=5", r"train.direct_first_steps.*the axis 'direct_first'"),
])
def test_bad_direct_first_configs_name_the_key_and_the_allowed_values(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        paradox_map.main(["--out", str(tmp_path / "x")] + _sets(override.split("; ")))
    assert not (tmp_path / "x").exists()


def test_shipped_config_and_its_quick_version():
    full = paradox_map.resolve(paradox_map.common.parse_args("paradox_map", ["--config", CONFIG]))
    assert full.rows.name == "direct_first" and full.rows.values == [0, 500, 1000, 1500, 1900, 1990]
    assert full.cols.values == [0.0, 0.3] and full.train.train_steps == 2000 and full.world.solver == "ddim"
    plan = engine.plan_map(full)
    # one CD, one Direct CD and one two-phase training per P > 0; every cell counted (none is a reference)
    assert sorted(m for _, m in plan.trainings) == sorted(
        [engine.CD, engine.DIRECT] + [("direct_first", p) for p in (500, 1000, 1500, 1900, 1990)])
    assert not any(c.reference for c in plan.cells)
    assert [c.base for c in plan.cells[:2]] == [engine.CD] * 2 and plan.cells[-1].base == ("direct_first", 1990)
    assert all(c.method == engine.DIRECT and c.budget == 2000 for c in plan.cells)
    # E is read at each switch P on the two-phase student and on Direct CD
    assert plan.trainings[((64, 2, 2), engine.DIRECT)].switches == {500, 1000, 1500, 1900, 1990}
    assert plan.trainings[((64, 2, 2), ("direct_first", 500))].eval_steps(True) == [500, 1000, 2000]
    # --quick: first and last P rescaled to the 80-step budget (1990 / 2000 -> 79.6, clipped to 79), two seeds
    quick = paradox_map.resolve(paradox_map.common.parse_args("paradox_map", ["--quick", "--config", CONFIG]))
    assert quick.quick and quick.rows.values == [0, 79] and quick.cols.values == [0.0, 0.3]
    assert quick.train.train_steps == 80 and quick.seeds == [0, 1]
    assert paradox_map.quick_overrides(full.model_copy(update={"rows": full.rows.model_copy(
        update={"values": [0, 10]})}))["rows"]["values"] == [0, 1]  # a P > 0 never rounds down to plain CD


def test_quick_run_and_its_p0_cells_equal_the_usual_cd_vs_direct_cd_cells(tmp_path):
    out = tmp_path / "ft"
    metrics = paradox_map.main(["--quick", "--config", CONFIG, "--out", str(out), "--no-progress"]
                               + _sets(SMALL + ["plots=false"]))
    saved = json.loads((out / "metrics.json").read_text())
    report.validate_metrics(saved)
    assert saved["quick"] is True
    fig = report.draw_map(saved)  # the heatmaps name the two-phase student
    assert "DCD→CD vs Direct CD" in fig._suptitle.get_text()
    assert any("E_DCD→CD − E_Direct CD" in ax.get_ylabel() for ax in fig.axes[3:])  # the colorbars
    import matplotlib.pyplot as plt

    plt.close(fig)
    regs = {r["label"]: r for r in saved["regimes"]}
    assert list(regs) == ["direct_first=0, score_error=0.0", "direct_first=0, score_error=0.3",
                          "direct_first=79, score_error=0.0", "direct_first=79, score_error=0.3"]
    assert [r["cell"]["base"] for r in regs.values()] == ["cd", "cd"] + ["direct_first(P=79)->cd"] * 2
    assert saved["verdicts"]["correction"]["num_comparisons"] == 4 and saved["map"]["comparison"]["base"] == "DCD→CD"
    assert "direct_cd vs direct_first(P=79)->cd" in (out / "table.md").read_text()
    # the usual map (width axis, no direct_first) with the same settings: its cells are the P = 0 cells
    usual = paradox_map.resolve(paradox_map.common.parse_args(
        "paradox_map", ["--quick", "--config", CONFIG] + _sets(SMALL + ["rows={name: width, values: [64]}"])))
    plain = paradox_map.run(usual.model_copy(update={"plots": False}))
    for r in plain["regimes"]:
        ft = regs[r["label"].replace("width=64", "direct_first=0")]
        for m in ("cd", "direct_cd"):
            for key in report.METRICS:
                assert ft["methods"][m][key]["values"] == pytest.approx(r["methods"][m][key]["values"], rel=1e-9, abs=0)
        assert ft["converged"] == r["converged"]
    # P > 0: the same Direct CD students, a different first student
    for d in ("0.0", "0.3"):
        p0, p79 = regs[f"direct_first=0, score_error={d}"], regs[f"direct_first=79, score_error={d}"]
        assert p79["methods"]["direct_cd"]["E_solver"]["values"] == p0["methods"]["direct_cd"]["E_solver"]["values"]
        assert p79["methods"]["cd"]["E_solver"]["values"] != p0["methods"]["cd"]["E_solver"]["values"]
        # up to the switch the two-phase student is the Direct CD student (same init, batches and optimizer)
        sw = p79["cell"]["switch"]
        assert sw["step"] == 79 and sw["cd"]["values"] == sw["direct_cd"]["values"]
        # what the CD phase did, and the two-phase student against plain CD of the same seeds (paired t, 95%)
        change = [a - b for a, b in zip(p79["methods"]["cd"]["E_solver"]["values"], sw["cd"]["values"])]
        assert sw["change"]["E_solver"]["mean"] == pytest.approx(sum(change) / 2, rel=1e-12)
        vs = [a - b for a, b in zip(p79["methods"]["cd"]["w2_teacher"]["values"], p0["methods"]["cd"]["w2_teacher"]["values"])]
        assert sw["vs_cd"]["w2_teacher"]["mean"] == pytest.approx(sum(vs) / 2, rel=1e-12)
        assert sw["vs_cd"]["E_solver"]["low"] <= sw["vs_cd"]["E_solver"]["mean"] <= sw["vs_cd"]["E_solver"]["high"]
        assert "switch" not in p0["cell"]
    assert metrics["timing"]["total_seconds"] > 0


def test_two_phase_training_is_direct_cd_then_cd():
    """The engine trains ``("direct_first", P)`` as ``TrainConfig(method='cd', direct_first_steps=P)``."""
    assert engine.train_update(("direct_first", 7)) == {"method": "cd", "k": None, "direct_first_steps": 7}
    assert engine.train_update(engine.DIRECT) == {"method": "direct_cd", "k": None}
    assert engine.base_of(0) == engine.CD and engine.method_name(engine.base_of(7)) == "direct_first(P=7)->cd"
    cfg = ParadoxMapConfig(rows={"name": "direct_first", "values": [0, 5]}, cols={"name": "score_error", "values": [0.1]},
                           train={"train_steps": 10, "warmup_steps": 2, "lr_schedule": "constant"})
    assert [c.reference for c in engine.plan_map(cfg).cells] == [False, False]
