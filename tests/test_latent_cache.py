"""sdxl.latent_cache on the tiny SDXL pipeline: cached values equal direct VAE / text-encoder calls,
reuse, resume, key sensitivity, webdataset sources, reading with workers, skip counts in index.json /
metrics.json / log.jsonl, the skip-share limit, the CLI and its checks at the door."""
from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("diffusers")

from odecm.cli import add_config_args, config_from_args, run_main  # noqa: E402
from sdxl.data import (REASONS, ImageCaptionDataset, ShardedSampler, TooManySkipsError, list_folder,  # noqa: E402
                       make_synthetic_dataset, write_shards)
from sdxl.latent_cache import (  # noqa: E402
    CachedLatentDataset,
    Encoders,
    LatentCacheConfig,
    build_cache,
    collate_cached,
    cond,
    main,
    sample_latents,
)
from sdxl.teacher import encode_latents, load_sdxl, make_time_ids  # noqa: E402

RES = 32  # tiny VAE: 32 px -> 16 x 16 latents


def parse(argv):
    return add_config_args(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def parts(tiny_sdxl_dir):
    return load_sdxl(str(tiny_sdxl_dir), dtype="fp32", device="cpu")


class CountingEncoders(Encoders):
    """Encoders that count how many captions and images they encode."""

    def __init__(self, parts, name="tiny"):
        self.images = self.captions = 0
        prompt_encoder = parts.prompt_encoder()

        def encode_prompts(captions):
            self.captions += len(captions)
            return prompt_encoder(captions)

        vae = parts.vae
        original_encode = vae.encode
        counter = self

        class VAE(torch.nn.Module):  # the same VAE, counting calls to encode
            config, device, dtype = vae.config, vae.device, vae.dtype

            def encode(self, x):
                counter.images += x.shape[0]
                return original_encode(x)

        super().__init__(VAE(), encode_prompts, name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(folder, 9, size=[(40, 48), (48, 36)], seed=3, corrupt=2)
    return folder


@pytest.fixture(scope="module")
def built(parts, data_dir, tmp_path_factory):
    """(cache folder, encoders used) of the fp32 cache of ``data_dir``, built once for the module."""
    encoders = CountingEncoders(parts)
    out = tmp_path_factory.mktemp("cache")
    return build_cache(_config(data_dir, out), encoders, progress=False), encoders, out


def _config(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="tiny", resolution=RES, shard_size=4, batch_size=3,
                store_dtype="fp32", device="cpu", max_skip_fraction=0.3)  # data_dir: 2 of 11 files are corrupt
    return LatentCacheConfig(**{**base, **kw})


def test_cache_equals_direct_computation(parts, data_dir, built):
    folder, encoders, out = built
    index = json.loads((folder / "index.json").read_text())
    assert index["complete"] and index["num_samples"] == 9 and index["skipped"] == 2
    assert index["latents"] == "posterior_mean_std" and index["scaling_factor"] == pytest.approx(0.13025)
    cached = CachedLatentDataset(folder)
    assert len(cached) == 9

    raw = ImageCaptionDataset(list_folder(data_dir), resolution=RES)
    samples = [s for s in (raw.try_get(j, 0) for j in range(len(raw))) if s is not None]
    pixels = torch.stack([s["pixel_values"] for s in samples])
    captions = [s["caption"] for s in samples]
    batch = collate_cached([cached[i] for i in range(9)])
    assert batch["caption"] == captions
    assert batch["latent_mean"].shape == (9, 4, RES // 2, RES // 2)

    # latent mean = s * posterior mean (teacher's encode_latents with sample=False)
    torch.testing.assert_close(batch["latent_mean"], encode_latents(parts.vae, pixels, sample=False),
                               atol=1e-5, rtol=1e-5)
    # a sample from the cache with noise eps equals encode_latents' posterior sample with the same eps
    direct = encode_latents(parts.vae, pixels, generator=torch.Generator().manual_seed(11))
    from_cache = sample_latents(batch, torch.Generator().manual_seed(11))
    torch.testing.assert_close(from_cache, direct, atol=1e-5, rtol=1e-5)
    assert (batch["latent_std"] > 0).all()

    prompt_embeds, text_embeds = parts.prompt_encoder()(captions)
    torch.testing.assert_close(batch["prompt_embeds"], prompt_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["text_embeds"], text_embeds, atol=1e-5, rtol=1e-5)
    original = torch.tensor([s["original_size"] for s in samples])
    crop = torch.tensor([s["crop_top_left"] for s in samples])
    torch.testing.assert_close(batch["time_ids"], make_time_ids(9, original, crop, (RES, RES)))
    assert original.tolist()[:2] == [[40, 48], [48, 36]] and crop.tolist()[:2] == [[0, 3], [5, 0]]
    c = cond(batch)
    assert set(c) == {"prompt_embeds", "text_embeds", "time_ids"} and c["time_ids"].shape == (9, 6)

    # second call: same key, nothing encoded again
    again = CountingEncoders(parts)
    assert build_cache(_config(data_dir, out), again, progress=False) == folder
    assert again.images == again.captions == 0
    assert (encoders.images, encoders.captions) == (9, 9)


def test_resume_skips_finished_shards(parts, data_dir, built, tmp_path):
    shutil.copytree(built[2], tmp_path, dirs_exist_ok=True)
    folder = tmp_path / built[0].name
    full = collate_cached([CachedLatentDataset(folder)[i] for i in range(9)])
    # simulate a run interrupted in the middle of shard 1: its file is a leftover .tmp, index incomplete
    index = json.loads((folder / "index.json").read_text())
    os.replace(folder / "shard-00001.safetensors", folder / "shard-00001.safetensors.tmp")
    del index["shards"]["shard-00001.safetensors"]
    index["complete"] = False
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        CachedLatentDataset(folder)
    resumed = CountingEncoders(parts)
    assert build_cache(_config(data_dir, tmp_path), resumed, progress=False) == folder
    assert resumed.images == 4  # records 4..7 are all readable; shards 0 and 2 were not redone
    again = collate_cached([CachedLatentDataset(folder)[i] for i in range(9)])
    for key in ("latent_mean", "prompt_embeds", "time_ids"):
        torch.testing.assert_close(again[key], full[key])
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped"] == 2 and index["skipped_by_reason"]["unreadable_image"] == 2
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["skipped"] == 2 and metrics["delivered"] == 9 and metrics["encoded_this_run"] == 4


def test_skip_counts_in_index_metrics_and_log(data_dir, built):
    folder = built[0]
    index = json.loads((folder / "index.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert index["skipped_by_reason"] == {**dict.fromkeys(REASONS, 0), "unreadable_image": 2}
    assert [s["skipped"] for s in index["shards"].values()] == [1, 0, 1]  # corrupt files at positions 1 and 10
    assert metrics["status"] == "complete" and metrics["num_samples"] == 9 and metrics["seen"] == 11
    assert metrics["skipped_by_reason"]["unreadable_image"] == 2 and metrics["skip_fraction"] == pytest.approx(2 / 11)
    corrupt = [r.path for r in list_folder(data_dir) if r.caption.startswith("corrupt file")]
    assert sorted(metrics["skip_examples"]["unreadable_image"]) == corrupt and len(corrupt) == 2
    assert [e["event"] for e in log] == ["unit", "unit", "unit", "complete"]
    assert [e["skipped"] for e in log[:3]] == [1, 0, 1] and log[2]["skipped_total"] == 2
    assert log[0]["skipped_unreadable_image"] == 1 and log[-1]["skipped_by_reason"] == {"unreadable_image": 2}


def test_too_many_skips_stop_the_build(parts, data_dir, tmp_path, capsys):
    cfg = _config(data_dir, tmp_path / "c", max_skip_fraction=0.1)  # 2 of 11 rows > 1.1
    with pytest.raises(TooManySkipsError, match=r"max_skip_fraction=0.1: 2 of 11 rows skipped .*unreadable_image 2"):
        build_cache(cfg, CountingEncoders(parts), progress=False)
    folder = next((tmp_path / "c").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "stopped_too_many_skips" and metrics["skipped_by_reason"]["unreadable_image"] == 2
    assert not json.loads((folder / "index.json").read_text())["complete"]
    # from the command line: one error line, exit status 2
    argv = ["--set", f"data={data_dir}", f"out={tmp_path / 'cli'}", "model=tiny", "device=cpu",
            f"resolution={RES}", "max_skip_fraction=0.1"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda a: build_cache(config_from_args(LatentCacheConfig, parse(a)), CountingEncoders(parts),
                                       progress=False), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: max_skip_fraction=0.1: 2 of 11")


def test_truncated_shard_is_counted(parts, data_dir, tmp_path):
    good = [r for r in list_folder(data_dir) if not r.caption.startswith("corrupt file")][:6]
    shards = write_shards(good, tmp_path / "tars", per_shard=3)
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[:len(data) // 2])
    folder = build_cache(_config(tmp_path / "tars", tmp_path / "c", max_skip_fraction=0.5), CountingEncoders(parts),
                         progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["skipped_by_reason"]["truncated_shard"] == 1 and index["skipped"] == 1
    assert 3 <= index["num_samples"] < 6
    assert json.loads((folder / "metrics.json").read_text())["skipped_by_reason"]["truncated_shard"] == 1


def test_key_depends_on_settings_and_listing(parts, tmp_path):
    data = tmp_path / "d"
    make_synthetic_dataset(data, 3, size=RES, seed=0)
    enc = CountingEncoders(parts)
    base = build_cache(_config(data, tmp_path / "c"), enc, progress=False)
    assert build_cache(_config(data, tmp_path / "c", crop="random"), enc, progress=False) != base
    assert build_cache(_config(data, tmp_path / "c", resolution=16), enc, progress=False) != base
    assert build_cache(_config(data, tmp_path / "c"), CountingEncoders(parts, name="other"), progress=False) != base
    (data / "img_00000.txt").write_text("a new caption")
    changed = build_cache(_config(data, tmp_path / "c"), enc, progress=False)
    assert changed != base and CachedLatentDataset(changed).captions[0] == "a new caption"


def test_webdataset_source_and_fp16_store(parts, data_dir, built, tmp_path):
    shards = write_shards(list_folder(data_dir), tmp_path / "tars", per_shard=5)  # 11 files -> 3 shards
    folder = build_cache(_config(tmp_path / "tars", tmp_path / "c", store_dtype="fp16"), CountingEncoders(parts),
                         progress=False)
    index = json.loads((folder / "index.json").read_text())
    assert index["num_units"] == len(shards) == 3 and index["num_samples"] == 9 and index["skipped"] == 2
    cached = CachedLatentDataset(folder)
    reference = CachedLatentDataset(built[0])
    assert cached.captions == reference.captions
    item, ref = cached[4], reference[4]
    assert item["latent_mean"].dtype == torch.float32
    torch.testing.assert_close(item["latent_mean"], ref["latent_mean"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(item["prompt_embeds"], ref["prompt_embeds"], atol=5e-3, rtol=2e-3)


def test_cached_dataset_with_workers_and_sampler(built):
    dataset = CachedLatentDataset(built[0])
    dataset[0]  # opens a handle in this process; workers must still get a picklable copy
    seen = []
    for rank in range(2):
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_cached,
                            sampler=ShardedSampler(len(dataset), seed=1, rank=rank, world_size=2, drop_last=True))
        for batch in loader:
            assert batch["latent_mean"].shape[1:] == (4, RES // 2, RES // 2)
            seen += batch["index"]
    assert len(seen) == len(set(seen)) == 8


def test_cli_end_to_end(tiny_sdxl_dir, tmp_path, capsys):
    data = tmp_path / "d"
    make_synthetic_dataset(data, 3, size=(36, 40), seed=1, index="jsonl")
    argv = ["--set", f"data={data / 'metadata.jsonl'}", f"model={tiny_sdxl_dir}", f"out={tmp_path / 'c'}",
            f"resolution={RES}", "device=cpu", "batch_size=2"]
    folder = main(argv)
    assert "3 samples, 0 skipped)" in capsys.readouterr().out
    assert CachedLatentDataset(folder)[2]["prompt_embeds"].shape == (77, 64)
    assert main(argv) == folder
    with pytest.raises(Exception, match="crop"):
        main(argv + ["--set", "crop=middle"])


def test_cli_checks_at_the_door(tmp_path, capsys):
    """Errors name the key and value, before any model loads (model=... does not exist) or any folder is made."""
    out = tmp_path / "c"

    def error(*settings):
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, ["--set", f"out={out}", "model=no/such-model", "device=cpu", *settings])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and not out.exists()
        return lines[0]

    assert error(f"data={tmp_path / 'nowhere'}") == f"error: data='{tmp_path / 'nowhere'}': no such file or folder"
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    assert "unknown file extension '.parquet'" in error(f"data={tmp_path / 'x.parquet'}")
    make_synthetic_dataset(tmp_path / "d", 2, size=16, seed=0)
    (tmp_path / "d" / "img_00000.txt").unlink()
    line = error(f"data={tmp_path / 'd'}")
    assert "img_00000.png (no img_00000.txt)" in line and "set allow_empty_captions=true" in line
    assert "background" in error(f"data={tmp_path / 'd'}", "background=[0,0,300]")


def test_model_resolution_and_device_problems_are_listed_together_at_the_door(tmp_path, capsys):
    """``sdxl.checks`` (shared with sdxl.train / sdxl.reference): every problem one line, nothing made."""
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')  # factor 8
    make_synthetic_dataset(tmp_path / "d", 2, size=16, seed=0)
    out = tmp_path / "c"
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    for settings, wanted in (
            ([f"model={model}", "resolution=1020", f"device={device}"],
             ["resolution=1020: must be a multiple of the VAE's downsampling factor 8; allowed e.g. 1016",
              f"device={device}: this machine has"]),
            ([f"model={model}", "device=meta"], ["device=meta: device type 'meta' is not supported"]),
            ([f"model={model}", f"vae={tmp_path / 'd'}", "device=cpu"], [f"vae={tmp_path / 'd'}: holds no config.json"])):
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, ["--set", f"data={tmp_path / 'd'}", f"out={out}", *settings])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == len(wanted) and not out.exists(), lines
        assert all(line.startswith(f"error: {w}") for line, w in zip(lines, wanted)), lines
