"""Teacher reference solutions for SDXL evaluation: ``python -m sdxl.reference --config F --set k=v``.

For every caption ``i`` the teacher's PF-ODE is solved from stored shared noise ``x_T^(i)`` down the
N-step skip grid (``odecm.grids.skip``) with DDIM, Euler or Heun (``odecm.solvers.solve``; the paper's
solvers are ``ddim``, ``euler_vp``, ``heun_vp``), the teacher being CFG around the frozen SDXL UNet
(paper: ``w = 9``, Imagen convention ``eps_u + w (eps_c - eps_u)``, zeroed unconditional embeddings).
The result is ``f_solver(x_T, T, 0)`` of the paper's eq. 6: the latent at ``grid[0]``, decoded by the
VAE for image metrics. Indexing (``model.timestep_offset``, default 1 = the paper's): N = 100 runs
1000, 990, ..., 10 -> 0 and t = 0 is clean data; with 0 (diffusers) 999, 989, ..., 9 -> 0, where t = 0 is
``alphas_cumprod[0]`` (sigma ~ 0.03), not clean data.

Shared initial noise: ``x_T^(i) ~ N(0, I)`` drawn with its own generator seeded from
``(noise_seed, i)``, so it does not depend on batch size, sharding or the number of captions. It is
stored once in ``<cache_dir>/noise/`` and reused by every reference (all solvers) and by
``sdxl.sample`` (every student): the same ``x_T`` for each caption everywhere.

Cache and resume. The output folder ``<cache_dir>/reference/<solver>-N<N>-w<w>-<key hash>`` (or
``out_dir``) is keyed by (model and VAE weights by content, dtype, timestep indexing, solver, N, w, CFG
convention, uncond, caption-file hash, number of captions, noise seed, resolution). A shard file
``shards/<first>-<last>.safetensors`` (latents + caption indices, written atomically after the shard's
PNGs) marks its captions done. Completeness is tracked **per caption index**: a rerun reads the indices
of every shard present, computes only the missing captions (whatever ``shard_size`` the earlier run
used), loads no model when none is missing, and refuses a cache in which a caption appears twice.
Under ``accelerate launch`` shard ``j`` of the plan belongs to process ``j mod world_size``.

Layout::

    manifest.json          key, captions file, noise file, latent shape, complete flag
    captions.json          the captions in order
    shards/00000-00063.safetensors  {"latents": (n, C, h, w) float32, "indices": (n,) int64}
    images/00000.png ...   decoded teacher samples (one per caption)
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from odecm.atomic import atomic_path
from .checks import check_device, check_model_source, vae_factor_problem
from .eval_config import ReferenceConfig, check_path, cli_config, input_error, resolve_model
from .eval_shards import (done_indices, folder_key_check, image_path, missing_indices, plan_shards,
                          read_latents, shard_files, shard_path, write_latent_shard, write_manifest)

Tensor = torch.Tensor

__all__ = ["read_captions", "file_sha256", "shared_noise", "noise_path", "reference_key", "reference_folder",
           "write_latent_shard", "shard_path", "shard_files", "done_indices", "plan_shards", "read_latents",
           "missing_indices", "check_reference_inputs", "run_reference", "latent_geometry", "latents_to_images",
           "SDXLBundle", "load_bundle", "folder_key_check", "image_path", "write_manifest"]

CAPTION_SUFFIXES = (".txt", ".jsonl", ".json")


# ------------------------------------------------------------------------------------------- captions
def read_captions(path: str | Path, limit: int | None = None) -> list[str]:
    """Captions from ``.txt`` (one per line, blank lines skipped) or ``.jsonl`` / ``.json`` records
    with a ``caption`` or ``text`` field (a ``.json`` list of strings also works)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    if path.suffix == ".txt":
        caps = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        recs = json.loads(text) if path.suffix == ".json" else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        caps = []
        for r in recs:
            if isinstance(r, str):
                caps.append(r)
            elif isinstance(r, dict) and ("caption" in r or "text" in r):
                caps.append(str(r.get("caption", r.get("text"))))
            else:
                raise ValueError(f"{path}: records need a 'caption' or 'text' field, got {r!r}")
    else:
        raise ValueError(f"caption file {path}: allowed suffixes {', '.join(CAPTION_SUFFIXES)}")
    return caps[:limit] if limit is not None else caps


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- noise
def noise_path(cache_dir: str | Path, seed: int, n: int, shape: Sequence[int]) -> Path:
    return Path(cache_dir) / "noise" / f"seed{seed}-{'x'.join(map(str, shape))}-n{n}.safetensors"


def _caption_seed(seed: int, i: int, stream: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(i) * 7919 + stream) % (2**63 - 1)


def _noise_readable(path: Path, shape: tuple[int, ...]) -> bool:
    """Does ``path`` hold a readable ``noise`` tensor of ``shape``? (A file that cannot be read is
    replaced, with a warning.)"""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            if tuple(fh.get_slice("noise").get_shape()) == tuple(shape):
                return True
    except Exception as err:  # noqa: BLE001 -- SafetensorError / OSError: a truncated file
        warnings.warn(f"{path}: unreadable noise file ({type(err).__name__}); drawing it again", stacklevel=3)
    return False


def shared_noise(cache_dir: str | Path, seed: int, n: int, shape: Sequence[int]) -> tuple[Tensor, Path]:
    """``(n, *shape)`` standard normal noise, one draw per caption ``i`` from generator seed ``(seed, i)``;
    stored in ``<cache_dir>/noise`` and loaded from there afterwards."""
    from safetensors.torch import load_file, save_file

    from .features_cache import _state

    path = noise_path(cache_dir, seed, n, shape)
    state = _state()
    if state.is_main_process and not _noise_readable(path, (n, *shape)):
        x = torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_caption_seed(seed, i)))
                         for i in range(n)])
        with atomic_path(path) as tmp:  # a name of this process's own: concurrent runs never mix their writes
            save_file({"noise": x}, str(tmp), metadata={"seed": str(seed), "n": str(n)})
    state.wait_for_everyone()
    return load_file(str(path))["noise"], path


# ------------------------------------------------------------------------------------------- model
class SDXLBundle:
    """Loaded SDXL parts for evaluation: components, schedule, prompt encoder, latent geometry."""

    def __init__(self, parts, timestep_offset: int, device: torch.device):
        from .teacher import schedule_from_scheduler_config

        self.parts, self.device = parts, device
        self.schedule = schedule_from_scheduler_config(parts.scheduler_config, timestep_offset)
        self.prediction_type = parts.scheduler_config.get("prediction_type", "epsilon")
        self.prompt_encoder = parts.prompt_encoder()

    def cond(self, captions: Sequence[str], resolution: int) -> dict:
        from .teacher import make_time_ids

        ids = make_time_ids(len(captions), (resolution, resolution), (0, 0), (resolution, resolution), device=self.device)
        return self.prompt_encoder.cond(list(captions), time_ids=ids)


def latent_geometry(unet_config: Any, vae_config: Any, resolution: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents of a ``resolution`` px image: C = UNet in_channels,
    h = w = resolution / 2^(#VAE blocks - 1) (SDXL: 8x)."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution={resolution} must be a multiple of the VAE factor {factor}")
    return int(unet_config.in_channels), resolution // factor, resolution // factor


def load_bundle(model_cfg, cache_dir: str | Path, device: torch.device) -> SDXLBundle:
    from .teacher import load_sdxl

    parts = load_sdxl(resolve_model(model_cfg, cache_dir), vae=model_cfg.vae, dtype=model_cfg.dtype,
                      vae_dtype=model_cfg.vae_dtype, device=device)
    return SDXLBundle(parts, model_cfg.timestep_offset, device)


def latents_to_images(vae, latents: Tensor) -> Tensor:
    """VAE decode -> float images in [0, 1]."""
    from .teacher import decode_latents

    return (decode_latents(vae, latents) + 1) / 2


# ------------------------------------------------------------------------------------------- key + door
def reference_key(cfg: ReferenceConfig, model_id: str, captions_hash: str, n: int) -> dict:
    """The inputs a reference depends on; model and VAE weights by content (``weights_fingerprint``)."""
    from .features_cache import weights_fingerprint

    return {
        "model": weights_fingerprint(model_id), "vae": weights_fingerprint(cfg.model.vae), "dtype": cfg.model.dtype,
        "timestep_offset": cfg.model.timestep_offset, "solver": cfg.solver, "grid_size": cfg.grid_size,
        "grid": "skip", "guidance_scale": cfg.guidance_scale, "cfg_convention": cfg.cfg_convention,
        "uncond": cfg.uncond, "captions_sha256": captions_hash, "num_captions": n, "noise_seed": cfg.noise_seed,
        "resolution": cfg.resolution,
    }


def reference_folder(cfg: ReferenceConfig) -> tuple[Path, dict]:
    """``(folder, key)``: ``out_dir`` if given, else ``<cache_dir>/reference/<solver>-N<N>-w<w>-<key hash>``."""
    model_id = resolve_model(cfg.model, cfg.cache_dir)
    n = len(read_captions(cfg.captions, cfg.num_captions))
    key = reference_key(cfg, model_id, file_sha256(cfg.captions), n)
    if cfg.out_dir:
        return Path(cfg.out_dir), key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.solver}-N{cfg.grid_size}-w{cfg.guidance_scale:g}-{digest}"
    return Path(cfg.cache_dir) / "reference" / name, key


def check_reference_inputs(cfg: ReferenceConfig) -> None:
    """Every check that needs no model (``sdxl.checks`` for the model, VAE and device): caption file, model /
    VAE sources, the resolution against the VAE's factor, the device, and an ``out_dir`` of other inputs."""
    suffixes = CAPTION_SUFFIXES
    check_path("captions", cfg.captions, "file", "a caption file (.txt, .jsonl or .json)")
    if Path(cfg.captions).suffix not in suffixes:
        raise input_error(f"captions={cfg.captions}: allowed suffixes {', '.join(suffixes)}")
    try:
        caps = read_captions(cfg.captions)
    except (ValueError, json.JSONDecodeError) as err:
        raise input_error(f"captions={cfg.captions}: {err}") from None
    if not caps:
        raise input_error(f"captions={cfg.captions}: no captions in the file; allowed: a file with at least one")
    if cfg.num_captions is not None and cfg.num_captions > len(caps):
        raise input_error(f"num_captions={cfg.num_captions}: the caption file holds only {len(caps)}; "
                          f"allowed: 1..{len(caps)} or null (all)")
    check_model_source("model.pretrained", cfg.model.pretrained)
    check_model_source("model.vae", cfg.model.vae)
    problem = vae_factor_problem("resolution", cfg.resolution, cfg.model.pretrained, cfg.model.vae)
    if problem:
        raise input_error(problem)
    check_device("device", cfg.device)
    if cfg.out_dir:
        folder, key = reference_folder(cfg)
        folder_key_check("out_dir", folder, "teacher_reference", key)


# ------------------------------------------------------------------------------------------- run
def _device(name: str | None):
    from .features_cache import _state

    return torch.device(name) if name else _state().device


def run_reference(cfg: ReferenceConfig, loader: Callable[[], SDXLBundle] | None = None) -> tuple[Path, dict]:
    """Compute (or reuse) the teacher reference; returns ``(folder, stats)`` with
    ``stats = {"teacher_calls", "teacher_evals", "shards_computed", "captions_computed", "captions_skipped"}``."""
    from tqdm.auto import tqdm

    from odecm.denoisers import NFECounter
    from odecm.grids import skip
    from odecm.solvers import get_solver, solve

    from .features_cache import _state, save_images
    from .teacher import make_teacher

    check_reference_inputs(cfg)
    state = _state()
    folder, key = reference_folder(cfg)
    captions = read_captions(cfg.captions, cfg.num_captions)
    n = len(captions)
    if state.is_main_process and folder.is_dir():
        done_indices(folder, cfg.decode, drop_incomplete=True)
    state.wait_for_everyone()
    done = done_indices(folder, cfg.decode) if folder.is_dir() else set()
    state.wait_for_everyone()  # every process plans from the same files before any writes more
    plan = plan_shards(n, cfg.shard_size, done)
    stats = {"teacher_calls": 0, "teacher_evals": 0, "shards_computed": [], "captions_computed": 0,
             "captions_skipped": len(done & set(range(n)))}
    manifest_path = folder / "manifest.json"
    if not plan and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if state.is_main_process and not manifest.get("complete"):
            manifest["complete"] = True
            write_manifest(manifest_path, manifest)
        return folder, stats

    device = _device(cfg.device)
    bundle = loader() if loader is not None else load_bundle(cfg.model, cfg.cache_dir, device)
    shape = latent_geometry(bundle.parts.unet.config, bundle.parts.vae.config, cfg.resolution)
    noise, npath = shared_noise(cfg.cache_dir, cfg.noise_seed, n, shape)
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "captions.json").write_text(json.dumps(captions, indent=0, ensure_ascii=False))
        manifest = {"kind": "teacher_reference", "key": key, "captions_file": str(cfg.captions),
                    "noise_file": str(npath), "latent_shape": list(shape), "num_captions": n,
                    "config": cfg.model_dump(mode="json"), "complete": False}
        write_manifest(manifest_path, manifest)
    state.wait_for_everyone()

    teacher = NFECounter(make_teacher(bundle.parts.unet, bundle.schedule, cfg.guidance_scale, cfg.cfg_convention,
                                      cfg.uncond, prompt_encoder=bundle.prompt_encoder,
                                      prediction_type=bundle.prediction_type))
    grid = skip(bundle.schedule, cfg.grid_size)
    solver = get_solver(cfg.solver)
    mine = [j for j in range(len(plan)) if j % state.num_processes == state.process_index]
    for j in tqdm(mine, desc=f"reference {cfg.solver} N={cfg.grid_size}", disable=not cfg.progress):
        idx = plan[j]
        outs = []
        for b in range(0, len(idx), cfg.batch_size):
            bi = idx[b:b + cfg.batch_size]
            x_T = noise[bi].to(device)
            cond = bundle.cond([captions[i] for i in bi], cfg.resolution)
            with torch.no_grad():
                res = solve(solver, teacher, x_T, grid, start_index=cfg.grid_size, cond=cond)
            lat = res.x.float()
            if cfg.decode:
                save_images(latents_to_images(bundle.parts.vae, lat), [image_path(folder, i) for i in bi])
            outs.append(lat.cpu())
        write_latent_shard(shard_path(folder, idx), torch.cat(outs), idx)
        stats["shards_computed"].append(shard_path(folder, idx).stem)
        stats["captions_computed"] += len(idx)
    stats["teacher_calls"], stats["teacher_evals"] = teacher.calls, teacher.evals
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = json.loads(manifest_path.read_text())
        manifest["complete"] = not missing_indices(folder, n, cfg.decode)
        write_manifest(manifest_path, manifest)
    return folder, stats


def main(argv=None) -> None:
    cfg = cli_config(ReferenceConfig, argv, "Teacher reference solutions (shared noise, N-step skip grid).",
                     prog="python -m sdxl.reference", door=check_reference_inputs)
    if cfg is None:  # --check
        return
    folder, stats = run_reference(cfg)
    print(json.dumps({"folder": str(folder), **stats}))


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
