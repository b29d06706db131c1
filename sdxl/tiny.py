"""Tiny randomly initialised SDXL-architecture pipelines for tests and CPU smoke runs.

``build_tiny_sdxl(folder, seed)`` writes a ``StableDiffusionXLPipeline`` folder with the same
component layout as ``stabilityai/stable-diffusion-xl-base-1.0`` (unet, vae, text_encoder,
text_encoder_2, tokenizer, tokenizer_2, scheduler), so every loader that takes a hub id also takes
this folder. The architecture keeps SDXL's structure at toy width:

* UNet2DConditionModel with ``addition_embed_type="text_time"``; ``cross_attention_dim`` = sum of
  the two text encoders' hidden sizes; ``projection_class_embeddings_input_dim`` =
  6 x ``addition_time_embed_dim`` + projection size of text encoder 2 (six time_ids);
* a two-block AutoencoderKL (downsampling factor 2, 4 latent channels, SDXL's scaling factor);
* CLIPTextModel + CLIPTextModelWithProjection (hidden 32, 2 layers), two byte-level CLIP
  tokenizers (no hub access: a ``vocab.json`` of the 256 byte symbols and their ``</w>`` forms plus
  the two special tokens, and a ``merges.txt`` with only the version line);
* EulerDiscreteScheduler with SDXL base's scheduler config.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["SDXL_SCHEDULER_CONFIG", "TINY_SIZES", "TINY_VAE_BLOCKS", "build_tiny_sdxl", "cached_tiny_sdxl", "tiny_sdxl_pipeline",
           "write_byte_tokenizer"]

#: SDXL base's scheduler fields (EulerDiscreteScheduler; DDIM/LCM read the same dict).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    clip_sample=False,
)

#: Sizes of the tiny model: images of ``image_size`` px give latents of ``latent_size``.
TINY_SIZES = dict(image_size=32, latent_size=16, hidden=32, time_embed=8, max_length=77)

#: The tiny VAE's ``block_out_channels`` (two blocks: downsampling factor 2); read by the checks at the door.
TINY_VAE_BLOCKS = (16, 32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (256 symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_byte_tokenizer(folder: str | Path) -> Path:
    """Write a byte-level CLIP vocabulary (514 tokens, no merges) that ``CLIPTokenizer.from_pretrained`` reads.

    Token ids: 0..255 byte symbols, 256..511 the same with ``</w>``, 512 ``<|startoftext|>``,
    513 ``<|endoftext|>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def _tokenizers(pad_token_2: str = "!"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_byte_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=TINY_SIZES["max_length"])
        # SDXL's second tokenizer pads with "!" rather than <|endoftext|>
        tok2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=TINY_SIZES["max_length"], pad_token=pad_token_2)
    return tok, tok2


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusionXLPipeline`` in memory (fp32, CPU), seeded."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    h, te = TINY_SIZES["hidden"], TINY_SIZES["time_embed"]
    tok, tok2 = _tokenizers()
    text_cfg = dict(
        hidden_size=h, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=TINY_SIZES["max_length"], hidden_act="gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        projection_dim=h, layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZES["latent_size"],
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=2 * h,  # text_encoder hidden + text_encoder_2 hidden
        addition_embed_type="text_time",
        addition_time_embed_dim=te,
        projection_class_embeddings_input_dim=6 * te + h,  # six time_ids + pooled projection of encoder 2
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=TINY_VAE_BLOCKS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SIZES["image_size"],
        scaling_factor=0.13025,
        force_upcast=False,
    )
    euler_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "timestep_spacing", "steps_offset", "interpolation_type", "use_karras_sigmas")
    scheduler = EulerDiscreteScheduler(**{k: SDXL_SCHEDULER_CONFIG[k] for k in euler_keys})
    # SDXL base's saved config also carries DDIM's fields, which DDIMScheduler.from_config reads
    scheduler.register_to_config(sample_max_value=1.0, set_alpha_to_one=False, clip_sample=False)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Create a tiny random SDXL pipeline and ``save_pretrained`` it to ``folder``; returns the folder.

    Load it back like real SDXL: ``StableDiffusionXLPipeline.from_pretrained(folder)`` or
    ``sdxl.teacher.load_sdxl(folder)``."""
    folder = Path(folder)
    pipe = tiny_sdxl_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def cached_tiny_sdxl(seed: int = 0, root: str | Path | None = None) -> Path:
    """The folder ``<root>/tiny_sdxl_seed<seed>`` of ``build_tiny_sdxl(seed)``, built on first use; ``root``
    defaults to odecm's cache folder (``odecm.runs.cache_root()``: ``$ODECM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/odecm``, else ``~/.cache/odecm``).

    The build draws from torch's global generator but restores its state afterwards, so whether a
    run had to build the model or found it changes nothing that follows. Several processes may call
    this at once: each builds into its own temporary folder and the first rename wins."""
    from odecm.runs import cache_root

    folder = Path(root if root is not None else cache_root()) / f"tiny_sdxl_seed{int(seed)}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    state = torch.random.get_rng_state()
    try:
        build_tiny_sdxl(tmp / "pipeline", seed)
        try:
            os.replace(tmp / "pipeline", folder)
        except OSError:  # another process finished first (the folder exists and is not empty)
            if not (folder / "model_index.json").exists():
                raise
    finally:
        torch.random.set_rng_state(state)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":  # python -m sdxl.tiny OUT_FOLDER [SEED]
    import sys

    out = build_tiny_sdxl(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"tiny SDXL pipeline written to {out}")
