"""studies.report on synthetic results folders: corrected verdicts, merged rows, smoke runs, claims that carry their
numbers, the CLI. Fast: no study runs (the end-to-end check on a real --quick run is in test_report_e2e.py)."""
from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from studies import report
from studies.common import stat, write_json
from studies.report_verdicts import regime_verdicts, study_verdicts
from studies.report_io import QUICK_LABEL, find_latest, folder_is_quick, load_study
from studies.stats import RegimeInput, classify_regimes

# per-seed offsets with mean exactly 0 (6 seeds): a planted effect is ``effect + scale * WOBBLE``
WOBBLE = [0.01, -0.01, 0.02, -0.02, 0.03, -0.03]
NULL_E = [0.1, -0.1, 0.05, -0.05, 0.02, -0.02]  # mean 0: the interval must contain 0
PARADOX = (0.5, 0.1)  # (dE, dQ): Direct CD lower E, CD better samples
NULL = (None, None)
DCD_BETTER = (0.5, -0.1)  # Direct CD lower E and better samples


def per_seed(effect):
    return NULL_E if effect is None else [effect + w for w in WOBBLE]


def regime(label, effect, q="w2_teacher", switches=None, group="", converged=None, base=0.0, **params):
    """A regime whose paired differences are the planted ``effect = (dE, dQ)`` (per seed)."""
    dE, dQ = per_seed(effect[0]), [x / 10 for x in per_seed(effect[1])] if effect[1] is None else per_seed(effect[1])
    e_dcd = [0.2 + base + 0.01 * i for i in range(6)]
    q_cd = [0.3 + base + 0.02 * i for i in range(6)]
    r = {"label": label, "group": group, "params": params, "switches": switches or {},
         "methods": {"cd": {"E": stat([a + d for a, d in zip(e_dcd, dE)]), q: stat(q_cd)},
                     "direct_cd": {"E": stat(e_dcd), q: stat([a + d for a, d in zip(q_cd, dQ)])}}}
    if converged is not None:
        r["converged"] = converged
    return r


EXACT = {"score_error": 0.0, "decoder": "identity"}
CONV = {"cd": True, "direct_cd": False}


def _write(folder: Path, metrics: dict, png: tuple[int, int, int] | None = None, config: dict | None = None,
           mtime: float | None = None) -> Path:
    folder.mkdir(parents=True)
    write_json(folder / "metrics.json", metrics)
    (folder / "config.json").write_text(json.dumps(config or {}))
    if png is not None:
        from PIL import Image

        Image.new("RGB", (320, 160), png).save(folder / f"{metrics.get('study', 'figure')}.png")
    if mtime is not None:
        os.utime(folder / "metrics.json", (mtime, mtime))
    return folder


def make_results(root: Path) -> Path:
    """A results tree covering every case the report must handle (see the module docstring)."""
    q = {"key": "w2_teacher", "label": "W2 to the teacher's samples"}
    se = [regime("exact ddim", NULL, switches=EXACT, converged=CONV, teacher="exact", solver="ddim"),
          regime("wrong d=0.3 ddim", PARADOX, switches={"score_error": 0.3, "decoder": "identity"},
                 converged=CONV, teacher="wrong", solver="ddim")]
    for r, (cd, dcd) in zip(se, [(0.5, 0.4), (0.4, 0.5)]):  # distance to the data: a second question
        r["methods"]["cd"]["w2_p0"] = stat([cd + w for w in WOBBLE])
        r["methods"]["direct_cd"]["w2_p0"] = stat([dcd + 2 * w for w in WOBBLE])
    _write(root / "score_error" / "run1", {
        "study": "score_error", "quick": False, "quality": q, "budget": {"train_steps": 200, "batch_size": 64},
        "alt_quality_keys": ["w2_p0"], "regimes": se,
        "floor": {"w2_teacher": {"mean": 0.05, "sd": 0.01, "values": [0.04, 0.05, 0.06] * 4}}},
        png=(255, 0, 0))
    same = regime("ddim N=10", DCD_BETTER, switches=EXACT, solver="ddim", N=10)
    euler = {**json.loads(json.dumps(same)), "label": "euler N=10", "params": {"solver": "euler", "N": 10}}
    _write(root / "solver_ablation" / "run1", {
        "study": "solver_ablation", "quality": q,
        "regimes": [same, euler, regime("heun N=10", NULL, switches=EXACT, solver="heun", N=10)]},
        config={"train": {"train_steps": 40, "batch_size": 64, "lr": 1e-3}})
    ib = [regime("width=8", NULL, switches=EXACT, group="capacity", width=8)]
    ib.append({**json.loads(json.dumps(ib[0])), "label": "ema=0.0", "group": "target", "params": {"ema": 0.0}})
    ib.append(regime("d=3", NULL, switches=EXACT, group="dimension", base=0.5, dim=3))
    _write(root / "inductive_bias" / "20240101-000000", {"study": "inductive_bias", "quality": q, "regimes": ib},
           mtime=1_700_000_000)
    _write(root / "inductive_bias" / "20240102-000000-quick", {  # newer, old naming convention: a smoke run
        "study": "inductive_bias", "quality": q,
        "regimes": [regime("SMOKE-PARADOX", PARADOX, switches=EXACT, group="capacity", width=4)]},
        mtime=1_800_000_000)
    lat = [regime("identity iters=10", NULL, q="fd_teacher", switches={"score_error": 0.0, "decoder": "identity"},
                  decoder="identity"),
           regime("mlp iters=10", PARADOX, q="fd_teacher", switches={"score_error": 0.0, "decoder": "mlp"},
                  decoder="mlp")]
    inputs = [RegimeInput.from_methods(r["label"], r["methods"]["cd"]["E"]["values"],
                                       r["methods"]["direct_cd"]["E"]["values"],
                                       r["methods"]["cd"]["fd_teacher"]["values"],
                                       r["methods"]["direct_cd"]["fd_teacher"]["values"], quality_key="fd_teacher")
              for r in lat]
    _write(root / "latent_space" / "run1", {
        "study": "latent_space", "quick": False,
        "quality": {"key": "fd_teacher", "label": "FD to the teacher's samples"},
        "budget": {"train_steps": 500}, "regimes": lat, "verdicts": classify_regimes(inputs).to_dict()},
        png=(0, 0, 255))
    _write(root / "image_world" / "run1", {
        "study": "image_world", "quick": True, "quality": q,
        "regimes": [regime("QUICK-PARADOX", PARADOX, switches=EXACT)]}, png=(0, 160, 0))
    sd = root / "sdxl_table" / "run1"
    sd.mkdir(parents=True)
    rows = [{"row": f"{m} ddim", "method": m, "solver": "ddim", "status": "ok",
             "k": {"1": {"ode_error_latent": e, "fid_teacher": f, "fd_dino_teacher": None}}}
            for m, e, f in (("cd", 0.30, 20.0), ("direct_cd", 0.20, 25.0))]
    (sd / "table.json").write_text(json.dumps({"rows": rows, "columns": [], "steps": ["1"]}))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results"))
    md, page, studies = report.build_report(root, root / "report")
    return root, md.read_text(), page.read_text(), studies


@pytest.fixture(scope="module")
def built_quick(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results_q"))
    md, page, studies = report.build_report(root, root / "report", include_quick=True)
    return root, md.read_text(), page.read_text(), studies


def section(md: str, title: str) -> str:
    """The markdown between heading ``title`` and the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", md, re.M)
    assert m, title
    level = len(m.group(1))
    rest = md[m.end():]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: nxt.start()] if nxt else rest


# --- verdicts -----------------------------------------------------------------------------------------------------

def test_two_standard_errors_over_three_seeds_is_not_a_paradox():
    """The old rule called |mean| > 2 SE 'clear'; over 3 seeds that is p ~ 0.12-0.18. Here t = 2.6 for both."""
    d = [1.0, 0.2, 0.6]  # mean 0.6, se 0.23: t = 2.6 < t_2(0.975) = 4.30
    r = {"label": "marginal", "methods": {"cd": {"E": stat([1 + x for x in d]), "w2": stat([0.1, 0.1, 0.1])},
                                          "direct_cd": {"E": stat([1.0] * 3), "w2": stat([0.1 + x / 10 for x in d])}}}
    (c,) = regime_verdicts({"quality": {"key": "w2"}, "regimes": [r]})
    assert c.dE == pytest.approx(0.6) and c.dQ == pytest.approx(0.06)
    assert c.dE > 2 * c.se_E and c.dQ > 2 * c.se_Q  # "clear" by the old rule
    assert c.verdict() == "tie" and not c.paradox
    assert c.result.dE.low < 0 < c.result.dE.high


def test_verdicts_are_classify_regimes_and_the_correction_counts_every_regime():
    # one moderate effect: a paradox alone, not once nine null regimes are counted with it (Holm over 10)
    moderate = [0.2, 0.7, 0.4, 0.8, 0.1, 0.3]  # t = 3.66, p = 0.015 for both differences
    r = {"label": "moderate", "methods": {
        "cd": {"E": stat([1 + x for x in moderate]), "w2": stat([0.1] * 6)},
        "direct_cd": {"E": stat([1.0] * 6), "w2": stat([0.1 + x for x in moderate])}}}
    alone = regime_verdicts({"quality": {"key": "w2"}, "regimes": [r]})
    assert [c.verdict() for c in alone] == ["paradox"] and alone[0].level == pytest.approx(0.95)
    nulls = [dict(regime(f"null {i}", NULL, q="w2", base=i), label=f"null {i}") for i in range(9)]
    many = regime_verdicts({"quality": {"key": "w2"}, "regimes": [r, *nulls]})
    ref = classify_regimes([RegimeInput.from_methods(x["label"], x["methods"]["cd"]["E"]["values"],
                                                     x["methods"]["direct_cd"]["E"]["values"],
                                                     x["methods"]["cd"]["w2"]["values"],
                                                     x["methods"]["direct_cd"]["w2"]["values"]) for x in [r, *nulls]])
    assert [c.verdict() for c in many] == [v.verdict for v in ref.regimes]
    assert [c.level for c in many] == pytest.approx([v.level for v in ref.regimes])
    assert many[0].verdict() != "paradox" and many[0].level == pytest.approx(1 - 0.05 / 10)
    assert ref.num_comparisons == 10


def test_seeds_pair_by_seed_and_bad_values_give_no_verdict():
    a = {"label": "a", "methods": {"cd": {"E": {**stat([3.0, 1.0]), "seeds": [1, 0]},
                                          "w2": {**stat([0.1, 0.1]), "seeds": [1, 0]}},
                                   "direct_cd": {"E": {**stat([0.5, 2.5]), "seeds": [0, 1]},
                                                 "w2": {**stat([0.2, 0.2]), "seeds": [0, 1]}}}}
    (c,) = regime_verdicts({"quality": {"key": "w2"}, "regimes": [a]})
    assert c.result.dE.values == pytest.approx([0.5, 0.5])  # seed 0: 1.0 - 0.5, seed 1: 3.0 - 2.5
    bad = json.loads(json.dumps(a))
    bad["methods"]["direct_cd"]["E"]["values"][0] = None  # a diverged seed (write_json stores nan as null)
    st = report.StudyResult("s", Path("."), {"quality": {"key": "w2"}, "regimes": [bad]}, "", [])
    sv = study_verdicts(st)
    assert sv.comparisons == [] and "non-finite" in sv.uncompared[0]


def test_schema_of_the_toy_studies(tmp_path):
    """studies.evidence's schema: a row the study merged ("ddim=euler N=4", merged_from, merged records with
    match), per-seed convergence flags, quality_p0 (the second question), budget with None entries."""
    kept = regime("ddim=euler N=4", PARADOX, q="w2", switches=EXACT, solver="ddim=euler", N=4)
    kept["merged_from"] = ["euler"]
    kept["converged"] = {"cd": [True, True, True, True, True, True], "direct_cd": [True, False] * 3}
    for m in ("cd", "direct_cd"):
        kept["methods"][m]["w2_p0"] = kept["methods"][m]["w2"]
    other = regime("heun N=4", NULL, q="w2", switches=EXACT, solver="heun", N=4)
    for m in ("cd", "direct_cd"):
        other["methods"][m]["w2_p0"] = other["methods"][m]["w2"]
    _write(tmp_path / "solver_ablation" / "run", {
        "study": "solver_ablation", "quick": False,
        "budget": {"train_steps": 1500, "grid_size": None, "convergence_rule": "E within 5%"},
        "quality": {"key": "w2", "label": "W2 to the teacher's samples (exact teacher: p_0)",
                    "higher_is_better": False},
        "quality_p0": {"key": "w2_p0", "label": "W2 to p_0"}, "regimes": [kept, other],
        "merged": [{"kept": "ddim", "dropped": "euler", "reason": "declared", "match": {"N": 4},
                    "max_abs_diff": 1e-4, "max_rel_diff": 1e-3}]})
    md = report.build_report(tmp_path, tmp_path / "rep")[0].read_text()
    sa = section(md, "solver_ablation: 1/2 regimes show the paradox")
    assert "| ddim=euler N=4 | 6 |" in sa and "converged" in sa and "| CD yes, Direct CD 3/6 seeds |" in sa
    assert "euler merged into ddim=euler N=4 (declared equivalent by odecm.solvers (merged by the study); " \
           "largest relative difference 0.001)" in sa
    assert "Training budget train_steps=1500, convergence_rule=E within 5%." in sa
    assert "- E vs w2_p0: 1/2 paradox" in sa


def test_study_e_key_from_its_verdicts(tmp_path):
    """score_error's schema: E against the teacher's solver is ``E_solver``, the exact-ODE error ``E_true_ode``."""
    exact = {"score_error": 3e-15, "decoder": "identity"}  # an exact teacher's measured error: float rounding
    rs = [regime("exact ddim", NULL, switches=exact, solver="ddim"),
          regime("wrong ddim", PARADOX, switches={"score_error": 0.2, "decoder": "identity"}, solver="ddim")]
    for r in rs:
        for m in ("cd", "direct_cd"):
            r["methods"][m]["E_solver"] = r["methods"][m].pop("E")
            r["methods"][m]["E_true_ode"] = r["methods"][m]["E_solver"]
    both = ("cd", "direct_cd")
    inputs = [RegimeInput.from_methods(r["label"], *(r["methods"][m]["E_solver"]["values"] for m in both),
                                       *(r["methods"][m]["w2_teacher"]["values"] for m in both),
                                       quality_key="w2_teacher") for r in rs]
    _write(tmp_path / "score_error" / "run", {
        "study": "score_error", "quick": False,
        "quality": {"key": "w2_teacher", "label": "W2 to the teacher's samples"}, "regimes": rs,
        "verdicts": {**classify_regimes(inputs).to_dict(), "e_key": "E_solver"},
        "floor_teacher": {"w2_teacher": {"mean": 0.1, "sd": 0.01, "values": [0.09, 0.11] * 5}}})
    md = report.build_report(tmp_path, tmp_path / "rep")[0].read_text()
    se = section(md, "score_error: 1/2 regimes show the paradox")
    assert "the study's own verdicts" in se and "| E_solver CD |" in se
    assert "| exact ddim | 6 | 0.225 ± 0.069 |" in se
    assert "- E_true_ode vs w2_teacher: 1/2 paradox" in se
    supports = section(md, "Score approximation").split("Against:")[0]
    assert "wrong ddim (paradox): dE_solver = 0.5 [" in supports and "with the exact score (1 tie)" in supports
    assert "- w2_teacher: 0.1 ± 0.01 over 10 draws" in section(md, "score_error")


def test_inconsistent_study_verdicts_are_recomputed(tmp_path):
    r = regime("r", NULL, q="w2")
    forged = {"correction": {"method": "holm", "alpha": 0.05, "num_comparisons": 1},
              "regimes": [{"label": "r", "verdict": "paradox", "level": 0.95, "quality_key": "w2",
                           "dE": {"mean": 0.0, "low": -1.0, "high": 1.0, "n": 6},
                           "dQ": {"mean": 0.0, "low": -1.0, "high": 1.0, "n": 6}}]}
    _write(tmp_path / "x" / "s", {"study": "x", "quality": {"key": "w2"}, "regimes": [r], "verdicts": forged})
    sv = study_verdicts(load_study("x", tmp_path / "x" / "s"))
    assert sv.source == "recomputed" and "unusable" in sv.note
    assert [c.verdict() for c in sv.comparisons] == ["tie"]


def test_reference_cells_are_never_counted(tmp_path):
    """paradox_map's k = 1 cells compare CD with itself ("reference": true): recomputed verdicts (here the p_0
    question, which the report always recomputes) leave them out of the comparisons and of the correction."""
    moderate = [0.2, 0.7, 0.4, 0.8, 0.1, 0.3]  # t = 3.66, p = 0.015
    cell = {"label": "k=2", "params": {"k": 2}, "methods": {
        "cd": {"E": stat([1 + x for x in moderate]), "w2_p0": stat([0.1] * 6)},
        "direct_cd": {"E": stat([1.0] * 6), "w2_p0": stat([0.1 + x for x in moderate])}}}
    same = {"E": stat([1.0 + w for w in WOBBLE]), "w2_p0": stat([0.1 + w for w in WOBBLE])}
    ref = {"label": "k=1", "params": {"k": 1}, "reference": True, "methods": {"cd": same, "direct_cd": same}}
    metrics = {"quality": {"key": "w2_p0"}, "regimes": [ref, cell]}
    (c,) = regime_verdicts(metrics)
    assert c.key == "k=2" and c.verdict() == "paradox" and c.level == pytest.approx(0.95)
    sv = study_verdicts(report.StudyResult("paradox_map", Path("."), metrics, "", []))
    assert [x.key for x in sv.comparisons] == ["k=2"] and sv.num_comparisons == 1 and sv.source == "recomputed"
    assert any("reference cells" in u and "k=1" in u for u in sv.uncompared), sv.uncompared
    # without the mark the same regime is counted: two comparisons, the cell's interval at Holm's 97.5%
    unmarked = {**metrics, "regimes": [{**ref, "reference": False}, cell]}
    counted = study_verdicts(report.StudyResult("paradox_map", Path("."), unmarked, "", []))
    assert counted.num_comparisons == 2 and counted.comparisons[1].level == pytest.approx(0.975)


# --- the report on synthetic folders -----------------------------------------------------------------------------

def test_summary_counts_and_states_intervals_and_budget(built):
    _, md, _, studies = built
    summary = section(md, "Summary")
    line = next(l for l in summary.splitlines() if l.startswith("- score_error:"))
    assert "1/2 regimes show the paradox (wrong d=0.3 ddim: dE = 0.5 [" in line
    assert "Holm over 2 regimes" in line and "training budget train_steps=200, batch_size=64" in line
    assert "- solver_ablation: 0/2 regimes show the paradox" in summary  # euler merged: 2 regimes, not 3
    assert "training budget train_steps=40, batch_size=64, lr=0.001 (from config.json)" in summary
    assert "- latent_space: 1/2 regimes show the paradox" in summary
    assert "missing: paradox_map" in md
    assert set(studies) == {"score_error", "solver_ablation", "inductive_bias", "latent_space", "image_world",
                            "sdxl_table"}


def test_explanations_follow_the_verdicts(built):
    _, md, _, _ = built
    score = section(md, "Score approximation")
    supports = score.split("Against:")[0]
    assert "score_error: the paradox holds with a wrong teacher score — wrong d=0.3 ddim (paradox)" in supports
    assert "in none of the 1 control regime(s) with the exact score (1 tie)" in supports
    assert "converged: CD yes, Direct CD no" in supports
    latent = section(md, "Latent space")
    assert "latent_space: the paradox holds with a non-identity decoder — mlp iters=10 (paradox)" in latent
    assert ("latent_space: the paradox holds with the exact score, so a wrong teacher score is not needed for it "
            "there — mlp iters=10") in score.split("Against:")[1]
    ib = section(md, "Inductive bias")
    against = ib.split("Against:")[1].split("Open")[0]
    assert "solver_ablation: with only the objective differing, Direct CD has the better samples" in against
    assert "ddim N=10 = euler N=10" in against
    # the sdxl single runs: no interval, so no verdict other than tie, and nothing claimed
    assert "sdxl_table: none of the 1 regime(s) with a wrong teacher score reaches a paradox verdict" in score
    assert "| tie (one seed: no interval) |" in md


def test_identical_rows_are_merged_and_named(built):
    _, md, _, _ = built
    sa = section(md, "solver_ablation: 0/2 regimes show the paradox")
    assert sa.count("ddim N=10 = euler N=10") == 1 and "| euler N=10 |" not in sa
    assert "euler N=10 merged into ddim N=10 (declared equivalent by odecm.solvers" in sa
    ib = section(md, "inductive_bias: 0/2 regimes show the paradox")
    assert "ema=0.0 merged into width=8 (every per-seed value agrees to 1e-12" in ib
    assert "Holm over 2 regimes" in ib
    studies = section(md, "solver_ablation")  # the per-regime metrics table shows merged rows once
    assert studies.count("| ddim N=10 = euler N=10 | CD |") == 1


def test_smoke_runs_are_left_out_and_labelled(built):
    root, md, page, _ = built
    findings = md.split("## Studies")[0]
    assert "SMOKE-PARADOX" not in md  # the newer -quick folder is passed over for the evidence run
    assert "QUICK-PARADOX" not in findings  # a quick study is shown only in its own section
    assert f"- image_world: {QUICK_LABEL}" in section(md, "Summary")
    assert "image_world" not in section(md, "Evidence per explanation")
    ib = section(md, "inductive_bias")
    assert "20240102-000000-quick" in ib and QUICK_LABEL in ib
    iw = section(md, f"image_world ({QUICK_LABEL})")
    assert f"| QUICK-PARADOX ({QUICK_LABEL}) | CD |" in iw
    assert f'<span class="quick">{QUICK_LABEL}</span>' in page
    assert find_latest(root, "inductive_bias") == root / "inductive_bias" / "20240101-000000"
    assert find_latest(root, "inductive_bias", include_quick=True).name == "20240102-000000-quick"
    assert find_latest(root, "image_world") is None and folder_is_quick(root / "image_world" / "run1")


def test_include_quick_labels_every_appearance(built_quick):
    _, md, _, _ = built_quick
    assert f"- [{QUICK_LABEL}] image_world: 1/1 regimes show the paradox" in section(md, "Summary")
    iw = section(md, "image_world: 1/1 regimes show the paradox")
    assert f"| QUICK-PARADOX ({QUICK_LABEL}) |" in iw and f"| paradox ({QUICK_LABEL}) |" in iw
    ib_support = section(md, "Inductive bias").split("Against:")[0]
    assert f"image_world: with the exact score and the identity decoder (only the objective differs) the paradox " \
           f"holds — [{QUICK_LABEL}] QUICK-PARADOX" in ib_support
    for line in md.splitlines():
        if "QUICK-PARADOX" in line or "SMOKE-PARADOX" in line:
            assert QUICK_LABEL in line, line


def test_second_questions_are_their_own_family(built):
    _, md, _, _ = built
    se = section(md, "score_error: 1/2 regimes show the paradox")
    line = next(l for l in se.splitlines() if l.startswith("- E vs w2_p0:"))
    # exact ddim: E tie, Direct CD closer to the data (dQ = -0.1) -> Direct CD better; wrong d=0.3: paradox
    assert line.startswith("- E vs w2_p0: 1/2 paradox (1 paradox, 1 Direct CD better; Holm over 2 regimes")
    assert "wrong d=0.3 ddim: dE = 0.5 [" in line


def test_study_verdicts_are_used_when_consistent(built):
    _, md, _, _ = built
    ls = section(md, "latent_space: 1/2 regimes show the paradox")
    assert "the study's own verdicts" in ls


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[-1].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _low(cell: str) -> float:
    m = re.search(r"\[([^,]+),", cell)
    return float(m.group(1)) if m else float("-inf")


@pytest.mark.parametrize("which", ["built", "built_quick"])
def test_every_verdict_in_a_table_follows_its_intervals(which, request):
    _, _, page, _ = request.getfixturevalue(which)
    p = _Tables()
    p.feed(page)
    checked = 0
    for t in p.tables:
        head = t[0]
        if "verdict" not in head:
            continue
        iE = next(i for i, h in enumerate(head) if h.startswith("dE"))
        iQ = next(i for i, h in enumerate(head) if h.startswith("d") and "CD better" in h)
        for row in t[1:]:
            both = _low(row[iE]) > 0 and _low(row[iQ]) > 0
            assert row[head.index("verdict")].startswith("paradox") == both, row
            checked += 1
    assert checked >= 9


def test_every_claim_carries_its_interval_correction_and_budget(built):
    _, md, _, _ = built
    ev = section(md, "Evidence per explanation")
    claims = [l for l in ev.splitlines() if l.startswith("- ") and l != "- (none)"]
    assert claims
    for line in claims:
        assert " over " in line and "regime" in line and "budget" in line, line
        if "the paradox holds" in line or "has the better samples" in line:
            assert re.search(r"\[-?[\d.e+-]+, -?[\d.e+-]+\]", line) and "converged:" in line, line
    # no sentence anywhere calls a regime a paradox unless its verdict is one
    for line in md.splitlines():
        m = re.search(r"(\d+)/\d+ regimes show the paradox", line)
        if m and int(m.group(1)) > 0 and not line.startswith("#"):
            assert "[" in line and "intervals" in line, line


# --- command line ------------------------------------------------------------------------------------------------

def test_cli_writes_both_files_and_refuses_bad_input(tmp_path, capsys):
    root = make_results(tmp_path / "results")
    assert report.main(["--results", str(root), "--out", str(tmp_path / "rep"), "--correction", "bonferroni"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Bonferroni over 2 regimes" in md and (tmp_path / "rep" / "report.html").is_file()
    # latent_space's own verdicts are Holm's: recomputed with the correction asked for
    ls = section(md, "latent_space: 1/2 regimes show the paradox")
    assert "Bonferroni over 2 regimes" in ls and "the study's verdicts use holm at 0.05; asked for bonferroni" in ls
    from odecm.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(report.main, ["--results", str(tmp_path / "nope")])
    assert e.value.code == 2 and "--results" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(report.main, ["--results", str(root), "--alpha", "1.5"])
    assert e.value.code == 2 and "alpha" in capsys.readouterr().err


def test_display_name_says_what_stands_on_each_side():
    from studies.report_io import display_name

    assert display_name({"label": "width=64"}) == "width=64"
    assert display_name({"label": "a", "members": ["a", "b"], "cell": {"base": "cd", "compared": "direct_cd"}}) == "a = b"
    two_phase = {"label": "direct_first=500", "cell": {"base": "direct_first(P=500)->cd", "compared": "direct_cd"}}
    assert display_name(two_phase) == "direct_first=500 (CD side: direct_first(P=500)->cd)"
    k_cell = {"label": "k=4", "cell": {"base": "cd", "compared": "cd_k(k=4)"}}
    assert display_name(k_cell) == "k=4 (Direct CD side: cd_k(k=4))"
