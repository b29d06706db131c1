"""Table 1 driver: renders from two tiny evaluated runs (CM and Direct CM labels), marks missing rows,
writes JSON and one image grid per run."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from sdxl import features as feat  # noqa: E402
from sdxl.eval_config import EvaluateConfig, MetricWeights, ReferenceConfig, SampleConfig  # noqa: E402
from sdxl.evaluate import evaluate  # noqa: E402
from sdxl.reference import load_bundle, run_reference  # noqa: E402
from sdxl.sample import run_sample  # noqa: E402
from sdxl.student import SDXLStudent  # noqa: E402
from studies import sdxl_table  # noqa: E402


def test_table_from_two_tiny_runs(tmp_path, tiny_sdxl_dir):
    (tmp_path / "captions.txt").write_text("a red cat\na blue dog\n")
    model = {"pretrained": str(tiny_sdxl_dir), "dtype": "fp32"}
    rcfg = ReferenceConfig(model=model, grid_size=2, captions=str(tmp_path / "captions.txt"), resolution=32,
                           cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    bundle = load_bundle(rcfg.model, rcfg.cache_dir, torch.device("cpu"))
    ref, _ = run_reference(rcfg, loader=lambda: bundle)
    clip = feat.CLIPEmbedder(str(feat.build_tiny_clip(tmp_path / "clip")))
    evals = []
    for method, scale in (("cd", 1.0), ("direct_cd", 0.5)):
        # two different "students": the tiny UNet with the LCM boundary, one with a scaled output
        base = SDXLStudent(bundle.parts.unet, bundle.schedule, "lora")
        student = (lambda x, t, c, b=base, s=scale: s * b(x, t, c))
        scfg = SampleConfig(reference=str(ref), steps=[1, 2], method=method, solver="ddim",
                            out_dir=str(tmp_path / method), progress=False, device="cpu")
        samples, _ = run_sample(scfg, loader=lambda st=student: (bundle, st))
        ecfg = EvaluateConfig(samples=str(samples), weights=MetricWeights(fid_inception=None, dino=None),
                              cache_dir=str(tmp_path / "features"), progress=False)
        evaluate(ecfg, extractors={"clip": clip}, skipped={"inception": "FID off", "dinov2": "FD-DINO off"})
        evals.append(samples / "eval")

    out = tmp_path / "table"
    (tmp_path / "nope").mkdir()  # a folder without metrics.json: a row saying so (a missing folder is refused)
    table = sdxl_table.main(["--runs", str(evals[0]), str(tmp_path / "direct_cd"), str(tmp_path / "nope"),
                             "--out", str(out), "--grid-captions", "2"])
    rows = {r["row"]: r for r in table["rows"]}
    m_cd = json.loads((evals[0] / "metrics.json").read_text())
    assert rows["CM DDIM"]["k"]["1"]["ode_error_latent"] == m_cd["k"]["1"]["ode_error_latent"]
    assert rows["CM DDIM"]["k"]["2"]["clip_score"] == m_cd["k"]["2"]["clip_score"]
    assert rows["Direct CM DDIM"]["status"] == "ok"
    assert rows["Direct CM DDIM"]["k"]["1"]["ode_error_latent"] != m_cd["k"]["1"]["ode_error_latent"]
    assert rows["CM Heun"]["status"].startswith("missing") and rows["Teacher Euler"]["status"].startswith("missing")
    assert rows["Teacher DDIM (N=2)"]["values"]["clip_score"] == pytest.approx(m_cd["teacher"]["clip_score"])
    assert any("no metrics.json" in r["status"] for r in table["rows"])
    md = (out / "table.md").read_text()
    assert "## k = 1 student step" in md and "## k = 4" in md and "| CM Euler | missing" in md
    assert "no k=4 samples" in md  # the runs only have k = 1, 2
    assert json.loads((out / "table.json").read_text())["columns"][0] == "ode_error_latent"
    from PIL import Image

    grids = sorted(out.glob("grid_*.png"))
    assert [g.name for g in grids] == ["grid_cd_ddim.png", "grid_direct_cd_ddim.png"]
    with Image.open(grids[0]) as im:
        assert im.size == (70 + 2 * 128, 3 * 128)  # rows: teacher, k=1, k=2; one column per caption
