"""Caches of the SDXL evaluation that cannot go stale: reference completeness per caption index whatever the
sharding (issue 11.2), sample folders keyed by their inputs (11.3), weights keyed by content (11.7)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from odecm.cli import InputError  # noqa: E402
from sdxl import reference as refmod  # noqa: E402
from sdxl.eval_config import ReferenceConfig, SampleConfig  # noqa: E402
from sdxl.features_cache import _DIGESTS, file_digest, weights_fingerprint  # noqa: E402
from sdxl.sample import run_sample  # noqa: E402
from sdxl.student import SDXLStudent  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ODECM_CACHE_DIR", str(tmp_path / "odecm_cache"))  # file_digests.json lands there


@pytest.fixture(scope="module")
def bundle(tiny_sdxl_dir):
    from sdxl.eval_config import EvalModelConfig

    return refmod.load_bundle(EvalModelConfig(pretrained=str(tiny_sdxl_dir), dtype="fp32"), ".", torch.device("cpu"))


def _ref_cfg(tmp_path, tiny_sdxl_dir, n=3, **kw):
    caps = tmp_path / "captions.txt"
    if not caps.exists():
        caps.write_text("\n".join(f"caption number {i}" for i in range(n)) + "\n")
    base = dict(model={"pretrained": str(tiny_sdxl_dir), "dtype": "fp32"}, grid_size=1, captions=str(caps),
                resolution=16, batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    return ReferenceConfig(**{**base, **kw})


def test_resume_with_another_shard_size_computes_exactly_the_missing_captions(tmp_path, tiny_sdxl_dir, bundle):
    cfg4 = _ref_cfg(tmp_path, tiny_sdxl_dir, n=20, shard_size=4)
    folder, stats = refmod.run_reference(cfg4, loader=lambda: bundle)
    assert stats["captions_computed"] == 20 and len(refmod.shard_files(folder)) == 5
    _, full = refmod.read_latents(folder, 20)

    # a run killed after captions 0-11: the last two shard markers never got written (PNGs of 12-13 did)
    for name in ("00012-00015", "00016-00019"):
        (folder / "shards" / f"{name}.safetensors").unlink()
    for i in range(14, 20):
        refmod.image_path(folder, i).unlink()
    assert refmod.missing_indices(folder, 20) == list(range(12, 20))

    # rerun with shard_size=8: exactly captions 12-19, no duplicates, the same latents as the uninterrupted run
    cfg8 = _ref_cfg(tmp_path, tiny_sdxl_dir, n=20, shard_size=8)
    assert refmod.reference_folder(cfg8)[0] == folder  # sharding is not part of the key
    folder8, stats8 = refmod.run_reference(cfg8, loader=lambda: bundle)
    assert folder8 == folder and stats8["captions_computed"] == 8 and stats8["captions_skipped"] == 12
    assert stats8["shards_computed"] == ["00012-00015", "00016-00019"]
    idx, z = refmod.read_latents(folder, 20)
    assert idx.tolist() == list(range(20)) and torch.allclose(z, full, atol=1e-5)
    assert json.loads((folder / "manifest.json").read_text())["complete"]

    # a hole in the middle, resumed with yet another size: the grid cell minus what is done
    (folder / "shards" / "00004-00007.safetensors").unlink()
    stats3 = refmod.run_reference(_ref_cfg(tmp_path, tiny_sdxl_dir, n=20, shard_size=16), loader=lambda: bundle)[1]
    assert stats3["shards_computed"] == ["00004-00007"] and stats3["captions_computed"] == 4
    assert torch.allclose(refmod.read_latents(folder, 20)[1], full, atol=1e-5)

    # a caption in two shards is a corrupt cache: refused, not silently duplicated
    shutil.copy(folder / "shards" / "00004-00007.safetensors", folder / "shards" / "00005-00005.safetensors")
    with pytest.raises(ValueError, match="caption 5 is in two shards|captions 4-7 are in two shards"):
        refmod.read_latents(folder, 20)
    with pytest.raises(ValueError, match="in two shards"):
        refmod.run_reference(cfg8, loader=lambda: pytest.fail("loaded a model for a corrupt cache"))


def test_a_truncated_shard_is_computed_again_with_a_warning(tmp_path, tiny_sdxl_dir, bundle):
    """A shard cut under its final name (an older writer, two runs sharing one temporary name) used to stop
    every later run with a SafetensorError traceback; now its captions are not done and are recomputed."""
    cfg = _ref_cfg(tmp_path, tiny_sdxl_dir, n=4, shard_size=2)
    folder, _ = refmod.run_reference(cfg, loader=lambda: bundle)
    _, full = refmod.read_latents(folder, 4)
    shard = folder / "shards" / "00002-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match="00002-00003.safetensors: unreadable latent shard"):
        _, stats = refmod.run_reference(cfg, loader=lambda: bundle)
    assert stats["captions_computed"] == 2 and stats["shards_computed"] == ["00002-00003"]
    idx, z = refmod.read_latents(folder, 4)
    assert idx.tolist() == [0, 1, 2, 3] and torch.allclose(z, full, atol=1e-5)
    assert json.loads((folder / "manifest.json").read_text())["complete"]


def test_incomplete_folder_is_named_per_caption(tmp_path, tiny_sdxl_dir, bundle):
    cfg = _ref_cfg(tmp_path, tiny_sdxl_dir, n=3, shard_size=1)
    folder, _ = refmod.run_reference(cfg, loader=lambda: bundle)
    (folder / "shards" / "00001-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"captions 1 of 0-2 are missing"):
        refmod.read_latents(folder, 3)


def _edit_one_tensor(path):
    """Add 1 to one element of one tensor; dtype, shape and hence the file size stay the same."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    sd = load_file(str(path))
    name = sorted(sd)[0]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] += 1
    save_file(sd, str(path), metadata=meta)


def test_reference_key_sees_weight_contents(tmp_path, tiny_sdxl_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl_dir, model)
    cfg = _ref_cfg(tmp_path, model)
    folder_a, key_a = refmod.reference_folder(cfg)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    size = unet.stat().st_size
    _edit_one_tensor(unet)
    assert unet.stat().st_size == size  # the old size-based key could not see this edit
    folder_b, key_b = refmod.reference_folder(cfg)
    assert key_a["model"] != key_b["model"] and folder_a != folder_b
    assert key_a["model"].startswith("model@")


def test_file_digest_is_remembered_by_path_size_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    cache = tmp_path / "digests.json"
    real = file_digest(f, cache)
    import hashlib

    assert real == hashlib.blake2b(b"abc", digest_size=32).hexdigest()
    # a fresh process reads the remembered digest instead of hashing again (here: a planted value)
    _DIGESTS.clear()
    table = json.loads(cache.read_text())
    (entry,) = table
    cache.write_text(json.dumps({entry: "planted"}))
    assert file_digest(f, cache) == "planted"
    # any write changes the mtime (and here the content): hashed again
    import os

    st = f.stat()
    f.write_bytes(b"abd")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert file_digest(f, cache) == hashlib.blake2b(b"abd", digest_size=32).hexdigest()


def test_sample_folder_refuses_other_weights(tmp_path, tiny_sdxl_dir, bundle):
    from diffusers import UNet2DConditionModel

    from sdxl.student import add_lora, save_lora

    ref, _ = refmod.run_reference(_ref_cfg(tmp_path, tiny_sdxl_dir, n=2), loader=lambda: bundle)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet")
    add_lora(unet, rank=2, alpha=2, init=False)
    lora_a = save_lora(unet, tmp_path / "a" / "lora")
    lora_b = tmp_path / "b" / "lora"
    shutil.copytree(lora_a, lora_b)
    _edit_one_tensor(lora_b / "pytorch_lora_weights.safetensors")  # same size, other weights
    assert weights_fingerprint(str(lora_a)) != weights_fingerprint(str(lora_b))

    student = SDXLStudent(bundle.parts.unet, bundle.schedule, "lora")
    common = dict(reference=str(ref), model={"timestep_offset": 1}, steps=[1], out_dir=str(tmp_path / "X"),
                  progress=False, device="cpu")
    _, stats = run_sample(SampleConfig(weights=str(lora_a), **common), loader=lambda: (bundle, student))
    assert stats["student_calls"] == 1
    # the same inputs again: nothing to do
    again = run_sample(SampleConfig(weights=str(lora_a), **common), loader=lambda: pytest.fail("model loaded"))[1]
    assert again["student_calls"] == 0
    # other weights into the same folder: refused, naming the difference, before any model loads
    with pytest.raises(InputError, match=r"out_dir=.*X: holds a student_samples of other inputs \(weights: 'lora@"):
        run_sample(SampleConfig(weights=str(lora_b), **common), loader=lambda: pytest.fail("model loaded"))
    manifest = json.loads((tmp_path / "X" / "manifest.json").read_text())
    assert manifest["weights"] == str(lora_a) and manifest["key"]["weights"] == weights_fingerprint(str(lora_a))
    # another step count extends the folder (k folders are independent); the manifest lists both
    run_sample(SampleConfig(weights=str(lora_a), **{**common, "steps": [2]}), loader=lambda: (bundle, student))
    assert json.loads((tmp_path / "X" / "manifest.json").read_text())["steps"] == [1, 2]
