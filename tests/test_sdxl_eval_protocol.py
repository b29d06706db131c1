"""The Fréchet-distance protocols (issue 10.10): the paper's (dgm-eval: JPEG q75 round trip, F.interpolate
bilinear + 2x - 1 for Inception, PIL bicubic for DINOv2) and TF1's, checked numerically against direct
PIL / torch computations and by hand, and recorded in metrics.json by sdxl.evaluate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from sdxl import features as feat  # noqa: E402

from sdxl_eval_fakes import fake_reference, fake_samples  # noqa: E402


def test_paper_inception_input_by_hand():
    # bilinear, align_corners=False, 2 -> 4: output j reads input (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25
    # (clamped), i.e. weights [1, 0], [.75, .25], [.25, .75], [0, 1] along each axis
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = 2 * (w @ x.double() @ w.T) - 1
    assert torch.allclose(feat.inception_input(x, "paper", size=4).double(), expected, atol=1e-6)
    # at 299 px: exactly dgm-eval's transform (F.interpolate of the [0, 1] image, then the model's 2x - 1)
    y = torch.randint(0, 256, (2, 3, 64, 48), generator=torch.Generator().manual_seed(1)).float() / 255
    direct = 2 * F.interpolate(y, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.equal(feat.inception_input(y, "paper"), direct)
    assert feat.inception_input(torch.ones(1, 3, 299, 299), "paper").max() == 1.0
    assert feat.inception_input(torch.zeros(1, 3, 299, 299), "paper").min() == -1.0


def test_tf1_inception_input_by_hand():
    x = torch.tensor([[[[0.0, 1.0]]]]).expand(1, 3, 1, 2)
    got = feat.inception_input(x, "tf1", size=4)
    # TF1 legacy coordinates: output j reads input j * 2 / 4 = 0, .5, 1, 1.5 (border clamp); then 255 x / 128 - 1
    row = torch.tensor([0.0, 0.5, 1.0, 1.0]) * 255 / 128 - 1
    assert torch.allclose(got[0, 0], row.expand(4, 4), atol=1e-6)
    assert feat.inception_input(torch.ones(1, 3, 299, 299), "tf1").max() == pytest.approx(255 / 128 - 1)
    with pytest.raises(ValueError, match="allowed"):
        feat.inception_input(x, "tf2")


def test_jpeg_roundtrip_is_pils_default_save(tmp_path):
    from PIL import Image

    imgs = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    pngs = [tmp_path / f"{i:05d}.png" for i in range(2)]
    feat.save_images(imgs, pngs)
    # the paper: image.save(f"{i}.jpg") with PIL's defaults, then read back
    for p in pngs:
        with Image.open(p) as im:
            im.save(p.with_suffix(".jpg"))
    expected = torch.stack([torch.from_numpy(np.asarray(Image.open(p.with_suffix(".jpg")).convert("RGB"))).permute(2, 0, 1)
                            for p in pngs]).float() / 255
    png_set = feat.ImageSet.from_paths(pngs)
    jpg_set = png_set.with_jpeg(75)
    assert torch.equal(jpg_set.load([0, 1]), expected)
    assert not torch.equal(png_set.load([0, 1]), expected)  # JPEG is lossy: the protocols differ
    assert jpg_set.fingerprint() != png_set.fingerprint()  # and so do their cache keys
    # quality 75 is PIL's default
    with Image.open(pngs[0]) as im:
        assert np.array_equal(np.asarray(feat.jpeg_roundtrip(im, 75)), np.asarray(Image.open(pngs[0].with_suffix(".jpg"))))


def test_dino_pil_resize_is_pils_bicubic():
    from PIL import Image

    x = torch.randint(0, 256, (2, 3, 40, 30), generator=torch.Generator().manual_seed(3)).float() / 255
    got = feat.pil_bicubic_resize(x, 224)
    u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    expected = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC)))
                            for a in u8]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(got, expected)
    torch_path = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert (got - torch_path).abs().max() > 1e-3  # the two resizes are not interchangeable


def test_protocol_table_and_defaults():
    from sdxl.eval_config import EvaluateConfig

    assert EvaluateConfig(samples="x").fd_protocol == "paper"
    p, t = feat.FD_PROTOCOLS["paper"], feat.FD_PROTOCOLS["tf1"]
    assert (p.jpeg_quality, p.inception, p.dino_resize) == (75, "paper", "pil")
    assert (t.jpeg_quality, t.inception, t.dino_resize) == (None, "tf1", "torch")


@pytest.mark.parametrize("protocol", ["paper", "tf1"])
def test_evaluate_applies_and_records_the_protocol(tmp_path, protocol):
    from PIL import Image

    from sdxl.eval_config import EvaluateConfig, MetricWeights
    from sdxl.evaluate import evaluate

    ref = fake_reference(tmp_path / "ref", n=3)
    samples = fake_samples(tmp_path / "samples", ref, n=3)
    dino = feat.DinoV2(str(feat.build_tiny_dinov2(tmp_path / "dino")), resize=feat.FD_PROTOCOLS[protocol].dino_resize)
    cfg = EvaluateConfig(samples=str(samples), fd_protocol=protocol, cache_dir=str(tmp_path / "features"), progress=False,
                         weights=MetricWeights(fid_inception=None, clip=None))
    res = evaluate(cfg, extractors={"dinov2": dino}, skipped={})

    def load(folder, name):
        paths = sorted(folder.glob("*.png"))
        if protocol == "paper":  # written as .jpg with PIL's defaults, as the paper did, then read back
            out = tmp_path / "jpg" / name
            out.mkdir(parents=True)
            for p in paths:
                Image.open(p).save(out / p.with_suffix(".jpg").name)
            paths = sorted(out.glob("*.jpg"))
        return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                            for p in paths]).float() / 255

    f_student, f_teacher = dino.embed(load(samples / "k1" / "images", "student")), dino.embed(load(ref / "images", "teacher"))
    assert res["k"]["1"]["fd_dino_teacher"] == pytest.approx(feat.frechet_distance(f_student, f_teacher), rel=1e-6)
    saved = json.loads((samples / "eval" / "metrics.json").read_text())
    assert saved["fd_protocol"]["name"] == protocol
    assert saved["fd_protocol"]["jpeg_quality"] == (75 if protocol == "paper" else None)
    assert any("fd_dino_teacher: 3 samples <= 32" in n for n in saved["notes"])
