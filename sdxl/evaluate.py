"""Evaluate a student sample set against its teacher reference: ``python -m sdxl.evaluate --set samples=DIR``.

For each k in the sample set (``k1``, ``k2``, ``k4``), paired by caption index with the teacher:

* ``ode_error_latent``: ``E = mean_{i, elements} (z_student^(i) - z_teacher^(i))^2`` in latent space
  (``odecm.metrics.ode_error``; for k = 1 this is the paper's eq. 6, ``f_theta(x_T, T)`` vs
  ``f_solver(x_T, T, 0)``; for k > 1 the same distance for the multistep sample);
* ``ode_error_pixel``: the same on the decoded images in ``[-1, 1]`` (the VAE's output range,
  read back from the 8-bit PNGs);
* ``fid_teacher`` / ``fd_dino_teacher``: Fréchet distances of Inception / DINOv2 features of the
  student's images against the teacher's (the paper's protocol), preprocessed by ``fd_protocol``
  (``sdxl.features.FD_PROTOCOLS``; default ``paper`` = dgm-eval on JPEG q75 copies of both sets);
  ``fid_real`` / ``fd_dino_real`` against a folder of real images when ``real_images`` is given (each
  resized, shorter side, and centre-cropped to the samples' resolution; read as stored, no JPEG pass);
* ``clip_score``: mean cosine between CLIP ViT-L/14 image and caption embeddings (not x 100), on the PNGs;
* ``aesthetic``: mean LAION aesthetic score, on the PNGs.

The teacher's own images get ``clip_score``, ``aesthetic`` and the ``*_real`` distances (the
teacher row of Table 1). Missing weights skip their metrics (``skipped`` in ``metrics.json``
says what to download); everything else runs. A Fréchet distance resting on ``n <= d`` samples is
logged as a warning and listed in ``notes``. Every input is checked before any network loads: both
folders must be complete per caption. Writes ``metrics.json`` (with ``fd_protocol`` and the timestep
indexing), ``table.md`` and the resolved config to ``out_dir`` (default ``<samples>/eval``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from odecm.metrics import ode_error

from .checks import check_device
from .eval_config import EvaluateConfig, check_path, cli_config, input_error
from .features import (FD_PROTOCOLS, ExtractorSpec, ImageSet, clip_score, extract_features, extract_text_features,
                       fd_sample_note, frechet_distance, load_extractors, load_images)
from .eval_shards import missing_indices, read_latents

__all__ = ["pixel_ode_error", "image_metrics", "evaluate", "metrics_table", "check_evaluate_inputs", "COLUMNS"]

log = logging.getLogger("sdxl.evaluate")

#: (metrics.json key, table header) in table order
COLUMNS = [("ode_error_latent", "E (latent)"), ("ode_error_pixel", "E (pixel)"), ("fid_teacher", "FID vs teacher"),
           ("fd_dino_teacher", "FD-DINO vs teacher"), ("fid_real", "FID vs real"), ("fd_dino_real", "FD-DINO vs real"),
           ("clip_score", "CLIP"), ("aesthetic", "Aesthetic")]


def pixel_ode_error(a: ImageSet, b: ImageSet, batch_size: int = 32) -> float:
    """``mean (x_a - x_b)^2`` over images and pixels, images mapped to [-1, 1]."""
    if len(a) != len(b):
        raise ValueError(f"image sets differ in size: {len(a)} vs {len(b)}")
    total, count = 0.0, 0
    for s in range(0, len(a), batch_size):
        idx = list(range(s, min(len(a), s + batch_size)))
        xa, xb = a.load(idx) * 2 - 1, b.load(idx) * 2 - 1
        total += float(((xa.double() - xb.double()) ** 2).sum())
        count += xa.numel()
    return total / count


def image_metrics(images: ImageSet, captions: list[str], extractors: dict[str, Any], cfg: EvaluateConfig,
                  against: dict[str, ImageSet], notes: list[str] | None = None, label: str = "") -> dict[str, float]:
    """Fréchet distances of ``images`` against each set in ``against`` (suffix = its key), CLIP score, aesthetic.

    The Fréchet distances see every set through ``FD_PROTOCOLS[cfg.fd_protocol]`` (a JPEG round trip of
    ``images`` and the teacher's set under ``paper``); a distance on ``n <= d`` samples adds a note."""
    out: dict[str, float] = {}
    kw = dict(cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, progress=cfg.progress)
    jpeg = FD_PROTOCOLS[cfg.fd_protocol].jpeg_quality
    fd_images = images.with_jpeg(jpeg)
    for name, prefix in (("inception", "fid"), ("dinov2", "fd_dino")):
        if name not in extractors:
            continue
        f = extract_features(extractors[name], fd_images, **kw)
        for suffix, other in against.items():
            other = other.with_jpeg(jpeg) if suffix == "teacher" else other
            g = extract_features(extractors[name], other, **kw)
            key = f"{prefix}_{suffix}"
            out[key] = frechet_distance(f, g)
            note = fd_sample_note(f"{label}{key}", len(f), len(g), f.shape[1])
            if note is not None:
                log.warning(note)
                if notes is not None:
                    notes.append(note)
    if "clip" in extractors:
        e_img = extract_features(extractors["clip"], images, **kw)
        e_txt = extract_text_features(extractors["clip"], captions, cache_dir=cfg.cache_dir)
        out["clip_score"] = float(clip_score(e_img, e_txt).mean())
        if "aesthetic" in extractors:
            out["aesthetic"] = float(extractors["aesthetic"](e_img).double().mean())
    return out


@dataclass
class EvalInputs:
    samples: Path
    sample_manifest: dict
    reference: Path
    ref_manifest: dict
    captions: list[str]


def check_evaluate_inputs(cfg: EvaluateConfig) -> EvalInputs:
    """Every check that needs no network: sample and reference folders (complete per caption), real
    images, metric weight files."""
    samples = Path(cfg.samples)
    check_device("device", cfg.device)
    check_path("samples", cfg.samples, "dir", "a folder written by sdxl.sample")
    if not (samples / "manifest.json").is_file():
        raise input_error(f"samples={samples}: no manifest.json; allowed: a folder written by sdxl.sample")
    sman = json.loads((samples / "manifest.json").read_text())
    if sman.get("kind") != "student_samples":
        raise input_error(f"samples={samples}: holds {sman.get('kind')!r}, not student samples")
    ref = Path(cfg.reference or sman["reference"])
    check_path("reference", str(ref), "dir", "a folder written by sdxl.reference (default: the samples' reference)")
    if not (ref / "manifest.json").is_file():
        raise input_error(f"reference={ref}: no manifest.json; allowed: a folder written by sdxl.reference")
    rman = json.loads((ref / "manifest.json").read_text())
    captions = json.loads((ref / "captions.json").read_text())
    n = len(captions)
    for folder, key in [(ref, "reference"), *[(samples / f"k{k}", "samples") for k in sman["steps"]]]:
        miss = missing_indices(folder, n, True) if folder.is_dir() else list(range(n))
        if miss:
            raise input_error(f"{key}={folder}: incomplete ({len(miss)} of {n} captions missing); allowed: a complete "
                              f"folder (rerun the command that wrote it: it resumes)")
    check_path("real_images", cfg.real_images, "dir", "a folder of real images (.png, .jpg, .jpeg, .webp)")
    check_path("weights.aesthetic", cfg.weights.aesthetic, "file", "the file sac+logos+ava1-l14-linearMSE.pth")
    if cfg.weights.fid_inception not in (None, "default"):
        check_path("weights.fid_inception", cfg.weights.fid_inception, "file",
                   "'default', null, or a TorchScript / pytorch-fid .pth file")
    return EvalInputs(samples, sman, ref, rman, captions)


def evaluate(cfg: EvaluateConfig, extractors: dict[str, Any] | None = None, skipped: dict[str, str] | None = None) -> dict:
    """Compute all metrics for every k of ``cfg.samples``; returns (and writes) the metrics dict."""
    inp = check_evaluate_inputs(cfg)
    samples, sman, ref, rman, captions = inp.samples, inp.sample_manifest, inp.reference, inp.ref_manifest, inp.captions
    n = len(captions)
    out_dir = Path(cfg.out_dir or samples / "eval")
    if extractors is None:
        w = cfg.weights
        spec = ExtractorSpec(fid_inception=w.fid_inception, dino=w.dino, clip=w.clip, aesthetic=w.aesthetic,
                             dino_resolution=w.dino_resolution, fd_protocol=cfg.fd_protocol)
        from .reference import _device

        extractors, skipped = load_extractors(spec, device=_device(cfg.device))
    skipped = dict(skipped or {})
    for msg in skipped.values():
        print(f"[sdxl.evaluate] {msg}")

    teacher_images = ImageSet.from_folder(ref / "images")
    _, z_teacher = read_latents(ref, n)
    against = {"teacher": teacher_images}
    if cfg.real_images:
        # real photos come in many sizes: shorter side -> the teacher's resolution, centre crop
        size = load_images(teacher_images.paths[:1]).shape[-1]
        against["real"] = ImageSet.from_folder(cfg.real_images, size=size)

    notes: list[str] = []
    per_k: dict[str, dict] = {}
    for k in sman["steps"]:
        folder = samples / f"k{k}"
        _, z_student = read_latents(folder, n)
        student_images = ImageSet.from_folder(folder / "images")
        m = {"ode_error_latent": ode_error(z_student, z_teacher),
             "ode_error_pixel": pixel_ode_error(student_images, teacher_images), "num_samples": len(student_images)}
        m.update(image_metrics(student_images, captions, extractors, cfg, against, notes, label=f"k={k} "))
        per_k[str(k)] = m
    teacher_row = image_metrics(teacher_images, captions, extractors, cfg,
                                {k: v for k, v in against.items() if k != "teacher"}, notes, label="teacher ")
    proto = FD_PROTOCOLS[cfg.fd_protocol]
    rkey = rman["key"]
    result = {
        "labels": sman.get("labels", {}),
        "teacher": {"solver": rkey["solver"], "grid_size": rkey["grid_size"], "guidance_scale": rkey["guidance_scale"],
                    "timestep_offset": rkey.get("timestep_offset"), **teacher_row},
        "k": per_k, "num_captions": n, "timestep_offset": sman.get("timestep_offset", rkey.get("timestep_offset")),
        "timesteps": sman.get("timesteps", {}),
        "fd_protocol": {"name": proto.name, "description": proto.description, "jpeg_quality": proto.jpeg_quality},
        "notes": notes, "skipped": skipped, "samples": str(samples), "reference": str(ref),
        "config": cfg.model_dump(mode="json"),
    }
    from .features_cache import _state

    if not _state().is_main_process:  # every process computed the (gathered) metrics; one writes them
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    (out_dir / "table.md").write_text(metrics_table(result))
    return result


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_table(result: dict) -> str:
    """Markdown: one row per k plus the teacher row; protocol, notes and skipped metrics below."""
    lab = result.get("labels", {})
    cols = [c for c in COLUMNS if any(c[0] in m for m in [*result["k"].values(), result["teacher"]])]
    t = result["teacher"]
    lines = [f"# {lab.get('method', 'student')} / {lab.get('solver', '?')} vs teacher "
             f"({t['solver']}, N={t['grid_size']}, w={t['guidance_scale']:g}); {result['num_captions']} captions", "",
             "| row | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, m in result["k"].items():
        lines.append(f"| student k={k} | " + " | ".join(_fmt(m.get(key)) for key, _ in cols) + " |")
    lines.append("| teacher | " + " | ".join(_fmt(t.get(key)) for key, _ in cols) + " |")
    proto = result.get("fd_protocol")
    if proto or result.get("timestep_offset") is not None:
        lines += ["", f"Timestep indexing: offset {result.get('timestep_offset')} "
                      f"({'paper' if result.get('timestep_offset') == 1 else 'diffusers'}); student timesteps "
                      f"{result.get('timesteps', {})}. Fréchet distances: {proto['name'] if proto else '?'} protocol "
                      f"({proto['description'] if proto else ''})."]
    if result.get("notes"):
        lines += ["", "Warnings:"] + [f"- {n}" for n in result["notes"]]
    if result.get("skipped"):
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    cfg = cli_config(EvaluateConfig, argv, "ODE error, FID, FD-DINO, CLIP score and aesthetic of a student sample set.",
                     prog="python -m sdxl.evaluate", door=check_evaluate_inputs)
    if cfg is None:  # --check
        return
    result = evaluate(cfg)
    print(metrics_table(result))


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
