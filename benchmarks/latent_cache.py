"""Training-data throughput with and without the latent cache (CPU).

    python -m benchmarks.latent_cache [--n 48 --resolution 128 --batch-size 8 --workers 0 --encoders tiny|real]

Decode-only path: the raw loader with no encoder at all (what reading PNGs alone costs).
Raw path: PNG decode + resize/crop (``sdxl.data.ImageCaptionDataset``) -> VAE posterior (``encode_posterior``)
+ both text encoders (``sdxl.teacher.PromptEncoder``) + time ids, per batch. Cached path:
``CachedLatentDataset`` -> ``sample_latents`` + ``cond``. Both are timed over one full epoch after one
warm-up batch and reported in samples/s; the one-off cache build time is reported too.

``--encoders tiny``: the tiny random pipeline of ``sdxl.tiny`` (what the tests use; its VAE downsamples
by 2). ``--encoders real``: randomly initialised modules with SDXL's real VAE and text-encoder
architectures (VAE 128/256/512/512, CLIP ViT-L text 768 x 12 layers, OpenCLIP bigG text 1280 x 32 layers;
byte-level tokenizer), so the encoder cost per image is SDXL's at the chosen resolution.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from sdxl.data import ImageCaptionDataset, collate, list_folder, make_synthetic_dataset  # noqa: E402
from sdxl.latent_cache import (  # noqa: E402
    CachedLatentDataset,
    Encoders,
    LatentCacheConfig,
    build_cache,
    collate_cached,
    cond,
    encode_posterior,
    sample_latents,
)
from sdxl.teacher import PromptEncoder, make_time_ids  # noqa: E402


def real_architecture_encoders(seed: int = 0) -> Encoders:
    """SDXL's VAE and text-encoder architectures, random weights (no hub access needed)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl.tiny import write_byte_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
        tok2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="!")
    common = dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu",
        projection_dim=1280, **common))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
    for module in (text_encoder, text_encoder_2, vae):
        module.requires_grad_(False).eval()
    return Encoders(vae, PromptEncoder(tok, tok2, text_encoder, text_encoder_2), "sdxl-architecture-random")


def tiny_encoders(folder: Path) -> Encoders:
    from sdxl.latent_cache import load_encoders
    from sdxl.tiny import build_tiny_sdxl

    return load_encoders(str(build_tiny_sdxl(folder / "model")), device="cpu")


def _epoch_rate(loader, step) -> tuple[float, int]:
    """Samples/s over one epoch, the first batch excluded (warm-up)."""
    iterator = iter(loader)
    step(next(iterator))
    count, start = 0, time.perf_counter()
    for batch in iterator:
        step(batch)
        count += len(batch["caption"])
    return count / (time.perf_counter() - start), count


@torch.no_grad()
def run(n: int, resolution: int, batch_size: int, workers: int, encoders_kind: str, image_size: tuple[int, int]):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic_dataset(tmp / "data", n + batch_size, size=image_size, seed=0)
        t0 = time.perf_counter()
        encoders = tiny_encoders(tmp) if encoders_kind == "tiny" else real_architecture_encoders()
        load_s = time.perf_counter() - t0

        dataset = ImageCaptionDataset(list_folder(tmp / "data"), resolution=resolution)

        def raw_step(batch):
            mean, std = encode_posterior(encoders.vae, batch["pixel_values"])
            latents = mean + std * torch.randn_like(mean)
            prompt_embeds, text_embeds = encoders.encode_prompts(batch["caption"])
            ids = make_time_ids(len(batch["caption"]), batch["original_size"], batch["crop_top_left"],
                                batch["target_size"])
            return latents, prompt_embeds, text_embeds, ids

        raw_loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        decode_rate, _ = _epoch_rate(raw_loader, lambda batch: None)
        raw_rate, counted = _epoch_rate(raw_loader, raw_step)

        cfg = LatentCacheConfig(data=str(tmp / "data"), out=str(tmp / "cache"), resolution=resolution,
                                batch_size=batch_size, device="cpu", store_dtype="fp16")
        t0 = time.perf_counter()
        folder = build_cache(cfg, encoders, progress=False)
        build_s = time.perf_counter() - t0
        cached = CachedLatentDataset(folder)
        generator = torch.Generator().manual_seed(0)

        def cached_step(batch):
            return sample_latents(batch, generator), cond(batch)

        cached_loader = DataLoader(cached, batch_size=batch_size, num_workers=workers, collate_fn=collate_cached)
        cached_rate, _ = _epoch_rate(cached_loader, cached_step)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    print(f"encoders={encoders_kind} resolution={resolution} source={image_size[0]}x{image_size[1]} "
          f"batch={batch_size} workers={workers} samples/epoch={counted} threads={torch.get_num_threads()}")
    print(f"| path | samples/s |\n|---|---|\n| raw images, decode + crop only | {decode_rate:.1f} |\n"
          f"| raw images -> VAE + text encoders | {raw_rate:.1f} |\n"
          f"| latent cache | {cached_rate:.1f} |")
    print(f"speed-up x{cached_rate / raw_rate:.1f}; cache build {build_s:.1f} s for {n + batch_size} images "
          f"({disk / (n + batch_size) / 1024:.0f} KiB/image, fp16); encoder load {load_s:.1f} s")
    return dict(decode=decode_rate, raw=raw_rate, cached=cached_rate, build_s=build_s)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latent_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="timed images (one more batch is the warm-up)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="source image size (default 1.25 x resolution by 1.5 x resolution)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--encoders", choices=("tiny", "real"), default="tiny")
    args = parser.parse_args(argv)
    size = tuple(args.image_size) if args.image_size else (int(1.25 * args.resolution), int(1.5 * args.resolution))
    return run(args.n, args.resolution, args.batch_size, args.workers, args.encoders, size)


if __name__ == "__main__":
    main()
