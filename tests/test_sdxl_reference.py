"""Teacher reference generation on a tiny SDXL: golden check against diffusers' DDIM loop, shared
noise, cache reuse without teacher calls, and resume after an interrupted shard."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from sdxl import reference as refmod  # noqa: E402
from sdxl.eval_config import ReferenceConfig  # noqa: E402

CAPTIONS = ["a red cat", "a blue dog on a hill", "a green tree"]


def _cfg(tmp_path, tiny_sdxl_dir, **kw):
    caps = tmp_path / "captions.txt"
    if not caps.exists():
        caps.write_text("\n".join(CAPTIONS) + "\n")
    base = dict(model={"pretrained": str(tiny_sdxl_dir), "dtype": "fp32", "timestep_offset": 0}, solver="ddim", grid_size=4,
                captions=str(caps), resolution=32, batch_size=2, shard_size=2, cache_dir=str(tmp_path / "cache"),
                progress=False, device="cpu")
    base.update(kw)
    return ReferenceConfig(**base)


def test_shared_noise_is_per_caption(tmp_path):
    a, pa = refmod.shared_noise(tmp_path, seed=3, n=3, shape=(4, 2, 2))
    b, _ = refmod.shared_noise(tmp_path, seed=3, n=2, shape=(4, 2, 2))
    c, _ = refmod.shared_noise(tmp_path, seed=4, n=2, shape=(4, 2, 2))
    assert torch.equal(a[:2], b) and not torch.allclose(b, c)
    assert pa.is_file() and abs(float(a.std()) - 1) < 0.5


def test_reference_golden_cache_and_resume(tmp_path, tiny_sdxl_dir):
    from diffusers import DDIMScheduler

    cfg = _cfg(tmp_path, tiny_sdxl_dir)
    loads = []

    def loader():
        loads.append(1)
        return refmod.load_bundle(cfg.model, cfg.cache_dir, torch.device("cpu"))

    folder, stats = refmod.run_reference(cfg, loader=loader)
    # 2 shards (2 + 1 captions), 4 DDIM steps, one batched CFG call per step
    assert stats["shards_computed"] == ["00000-00001", "00002-00002"]
    assert stats["teacher_calls"] == 8 and stats["teacher_evals"] == 12
    idx, z = refmod.read_latents(folder)
    assert idx.tolist() == [0, 1, 2] and z.shape == (3, 4, 16, 16)
    assert all(refmod.image_path(folder, i).is_file() for i in range(3))
    man = json.loads((folder / "manifest.json").read_text())
    assert man["complete"] and json.loads((folder / "captions.json").read_text()) == CAPTIONS

    # golden: diffusers' DDIM ("trailing" = 999, 749, 499, 249; last step ends at alphas_cumprod[0]),
    # Imagen CFG w = 9 with zeroed text embeddings, from the stored noise
    bundle = loader()
    noise = refmod.shared_noise(cfg.cache_dir, 0, 3, (4, 16, 16))[0]
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    cond = bundle.cond(CAPTIONS[:2], 32)
    x = noise[:2].clone()
    unet = bundle.parts.unet
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond["prompt_embeds"], 0 * cond["prompt_embeds"]]),
                       added_cond_kwargs={"text_embeds": torch.cat([cond["text_embeds"], 0 * cond["text_embeds"]]),
                                          "time_ids": torch.cat([cond["time_ids"], cond["time_ids"]])}).sample
            e_c, e_u = eps.chunk(2)
            x = sched.step(e_u + 9.0 * (e_c - e_u), t, x).prev_sample
    assert torch.allclose(z[:2], x, atol=1e-4, rtol=1e-4)

    # second call: everything cached -> no model load, zero teacher calls
    n_loads = len(loads)
    folder2, stats2 = refmod.run_reference(cfg, loader=loader)
    assert folder2 == folder and stats2["teacher_calls"] == 0 and stats2["captions_skipped"] == 3
    assert len(loads) == n_loads

    # simulate a run killed inside shard 1: its latents marker never got written, a temp file is left
    (folder / "shards" / "00002-00002.safetensors").rename(folder / "shards" / "00002-00002.tmp")
    folder3, stats3 = refmod.run_reference(cfg, loader=loader)
    assert stats3["shards_computed"] == ["00002-00002"] and stats3["teacher_calls"] == 4
    _, z3 = refmod.read_latents(folder3)
    assert torch.allclose(z3, z, atol=1e-6)

    # a different solver or guidance scale is a different cache entry
    assert refmod.reference_folder(_cfg(tmp_path, tiny_sdxl_dir, solver="heun"))[0] != folder
    assert refmod.reference_folder(_cfg(tmp_path, tiny_sdxl_dir, guidance_scale=5.0))[0] != folder


def test_reference_config_errors_name_the_key(tmp_path):
    from odecm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="solver"):
        load_config(ReferenceConfig, None, ["captions=x.txt", "solver=rk4"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ReferenceConfig, None, ["captions=x.txt", "nope=1"])
