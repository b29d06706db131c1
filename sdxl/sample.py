"""Student samples for SDXL evaluation: ``python -m sdxl.sample --set reference=DIR weights=RUN/lora``.

k-step consistency sampling (LCM's multistep sampler with re-noising), from the **same stored
initial noise** ``x_T^(i)`` as the teacher reference (read from the reference folder's manifest):

    x <- x_T
    for j, t_j in enumerate(timesteps):            # paper indexing: k=1 [1000]; 2 [1000, 500]; 4 [1000, 750, 500, 250]
        x0 <- f_theta(x, t_j, cond)                  # student consistency function (LCM boundary)
        if j < k - 1: x <- alpha(t_{j+1}) x0 + sigma(t_{j+1}) z_j,   z_j ~ N(0, I)
    sample = x0

Indexing. Each student is sampled in its own timestep indexing, read from ``odecm_student.json`` next to
the LoRA or its training run's ``config.json`` (up to two folders above): ``model.timestep_offset``
1 (paper) gives the timesteps above, 0 (diffusers) gives [999], [999, 499], [999, 749, 499, 249]. The
student's, the reference's and the request's (``model.timestep_offset``) indexing must agree; a mismatch
is an error naming all three. A student without a run config needs ``model.timestep_offset`` given.
The run config also supplies the labels (``distill.method`` / ``distill.solver``), the LCM boundary
(``student.sigma_data`` / ``student.timestep_scaling``), and the teacher settings the reference must
match (solver, N, w, CFG convention, uncond; ``allow_reference_mismatch=true`` accepts a mismatch).

The re-noising draws ``z_j`` come from a generator seeded by ``(renoise_seed, caption index)``, so
samples do not depend on batch size or sharding. With k = 1 the sample is ``f_theta(x_T, T)``, the
student side of the paper's ODE error (eq. 6). The student is not guidance-conditioned (paper); CFG is
distilled in. The model (teacher weights, VAE, dtype) defaults to the reference's.

Layout of ``out_dir`` (keyed like the reference: a folder written from other inputs, e.g. other
weights, is refused, naming what differs)::

    manifest.json        key (weights content hash, kind, labels, indexing, reference), steps, timesteps
    k1/shards/*.safetensors, k1/images/00000.png ...   (same layout as sdxl.reference)
    k2/...  k4/...
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checks import check_device
from .eval_config import (EvalModelConfig, SampleConfig, check_model_source, check_path, cli_config, input_error,
                          resolve_model, student_timesteps)
from .eval_shards import (done_indices, folder_key_check, image_path, missing_indices, plan_shards, shard_path,
                          write_latent_shard, write_manifest)
from .reference import SDXLBundle, _caption_seed, _device, latents_to_images

Tensor = torch.Tensor

__all__ = ["multistep_sample", "load_student_bundle", "find_run_config", "find_run_labels", "resolve_indexing",
           "SamplePlan", "plan_sample", "run_sample"]


def multistep_sample(student: Callable[[Tensor, Tensor, Any], Tensor], schedule, x_T: Tensor, timesteps: list[int],
                     cond: Any, renoise: list[Tensor] | None = None) -> Tensor:
    """LCM multistep sampling (formula in the module docstring); ``renoise[j]`` is ``z_j``, shape of ``x_T``."""
    x = x_T
    x0 = x_T
    for j, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = student(x, tt, cond)
        if j + 1 < len(timesteps):
            tn = torch.full((x.shape[0],), float(timesteps[j + 1]), device=x.device, dtype=torch.float64)
            a = schedule.alpha(tn).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
            s = schedule.sigma(tn).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
            x = a * x0 + s * renoise[j].to(x0)
    return x0


# ------------------------------------------------------------------------------------------- run config
def _from_student_info(info: dict) -> dict:
    """``odecm_student.json`` (written by sdxl.train next to the LoRA) in the shape of a run config."""
    return {"model": {"timestep_offset": info.get("timestep_offset"), "pretrained": info.get("model")},
            "student": {k: info[k] for k in ("sigma_data", "timestep_scaling") if k in info},
            "teacher": {k: info[k] for k in ("guidance_scale", "cfg_convention", "uncond") if k in info},
            "distill": {k: info[k] for k in ("method", "solver", "grid_size") if k in info}}


def find_run_config(weights: str | None) -> tuple[Path | None, dict]:
    """What the student was trained with: ``odecm_student.json`` in the weights folder (it travels with the
    LoRA), else a training run's resolved config (``config.json`` / ``config.yaml`` / ``resolved_config.json``
    with a ``distill`` section) in the weights folder or up to two folders above; ``(None, {})`` if none."""
    if weights is None:
        return None, {}
    import yaml

    from .student import STUDENT_INFO

    p = Path(weights)
    start = p if p.is_dir() else p.parent
    info = start / STUDENT_INFO
    if info.is_file():
        try:
            data = json.loads(info.read_text())
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "method" in data:
            return info, _from_student_info(data)
    for folder in [start, *list(start.parents)[:2]]:
        for name in ("config.json", "config.yaml", "resolved_config.json"):
            f = folder / name
            if f.is_file():
                try:
                    data = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
                except (json.JSONDecodeError, yaml.YAMLError):
                    continue
                if isinstance(data, dict) and isinstance(data.get("distill"), dict) and "method" in data["distill"]:
                    return f, data
    return None, {}


def find_run_labels(weights: str | None) -> dict:
    """``method`` / ``solver`` from a training run's resolved config, if there is one."""
    _, data = find_run_config(weights)
    d = data.get("distill", {})
    return {"method": d["method"], "solver": d.get("solver")} if "method" in d else {}


def resolve_indexing(request: int | None, reference: int, student: int | None, student_source: str | None,
                     reference_source: str, weights: str | None) -> int:
    """The one timestep indexing of student, reference and request (module docstring), or an ``InputError``
    naming all three values."""
    given = [v for v in (request, reference, student) if v is not None]
    if len(set(given)) > 1:
        show = lambda v: "unset" if v is None else str(v)  # noqa: E731
        raise input_error(
            f"model.timestep_offset: the student, the reference and the request disagree on the timestep indexing: "
            f"student={show(student)} ({student_source or 'no run config'}), reference={reference} ({reference_source}), "
            f"request={show(request)}; allowed: one value for all three (0 = diffusers, 1 = paper); evaluate a "
            f"student against a reference made in its own indexing")
    if student is None and weights is not None and request is None:
        raise input_error(
            f"model.timestep_offset: unknown for weights={weights} (no training-run config.json with "
            f"model.timestep_offset next to it); allowed: pass model.timestep_offset=0 (diffusers) or 1 (paper), "
            f"the indexing the student was trained in")
    return reference


# ------------------------------------------------------------------------------------------- plan (door)
@dataclass
class SamplePlan:
    """Everything ``run_sample`` needs, resolved and checked before any model loads."""

    reference: Path
    ref_manifest: dict
    captions: list[str]
    model: EvalModelConfig
    cache_dir: str
    offset: int
    labels: dict
    key: dict
    run_config: dict = field(default_factory=dict)

    @property
    def boundary(self) -> tuple[float, float]:
        s = self.run_config.get("student", {})
        return float(s.get("sigma_data", 0.5)), float(s.get("timestep_scaling", 10.0))


def _same_weights(key: str, given: str | None, ref_value: str | None, cache_dir: str) -> None:
    """``given`` (a model / VAE source) must be the reference's by content."""
    from .features_cache import weights_fingerprint

    if given is None:
        return
    fp = weights_fingerprint(resolve_model(EvalModelConfig(pretrained=given), cache_dir) if key == "model.pretrained"
                             else given)
    if fp != ref_value:
        raise input_error(f"{key}={given}: differs from the reference's ({ref_value}); the student is the teacher "
                          f"plus its LoRA, so it is sampled on the reference's weights; allowed: omit {key}")


def plan_sample(cfg: SampleConfig) -> SamplePlan:
    """Check every input (reference, weights, indexing, labels, out_dir) and resolve them; no model loads."""
    from .features_cache import weights_fingerprint

    ref = Path(cfg.reference)
    check_path("reference", cfg.reference, "dir", "a folder written by sdxl.reference")
    man_path = ref / "manifest.json"
    if not man_path.is_file():
        raise input_error(f"reference={ref}: no manifest.json; allowed: a folder written by sdxl.reference")
    rman = json.loads(man_path.read_text())
    if rman.get("kind") != "teacher_reference":
        raise input_error(f"reference={ref}: holds {rman.get('kind')!r}, not a teacher reference")
    captions = json.loads((ref / "captions.json").read_text())
    missing = missing_indices(ref, len(captions), rman["config"].get("decode", True))
    if missing:
        raise input_error(f"reference={ref}: incomplete ({len(missing)} of {len(captions)} captions missing); "
                          f"allowed: a complete reference (rerun its sdxl.reference command: it resumes)")
    check_path("weights", cfg.weights, "any", "a LoRA folder / .safetensors file, or a folder with unet/ (kind full)")
    if cfg.kind == "full":
        if cfg.weights is None:
            raise input_error("weights: kind=full needs weights=<folder with unet/>; allowed: a student folder")
        check_path("weights", str(Path(cfg.weights) / "unet"), "dir", "a folder with unet/ for kind=full")
    check_model_source("model.pretrained", cfg.model.pretrained)
    check_model_source("model.vae", cfg.model.vae)
    check_device("device", cfg.device)

    rkey, rmodel = rman["key"], rman["config"]["model"]
    cache_dir = rman["config"].get("cache_dir", ".")
    _same_weights("model.pretrained", cfg.model.pretrained, rkey["model"], cache_dir)
    _same_weights("model.vae", cfg.model.vae, rkey["vae"], cache_dir)

    run_path, run = find_run_config(cfg.weights)
    student_offset = run.get("model", {}).get("timestep_offset") if run else None
    offset = resolve_indexing(cfg.model.timestep_offset, int(rkey["timestep_offset"]), student_offset,
                              str(run_path) if run_path else None, str(man_path), cfg.weights)
    if run and not cfg.allow_reference_mismatch:
        d, t = run.get("distill", {}), run.get("teacher", {})
        ours = {"solver": d.get("solver"), "grid_size": d.get("grid_size", d.get("num_steps")),
                "guidance_scale": t.get("guidance_scale"), "cfg_convention": t.get("cfg_convention"),
                "uncond": t.get("uncond")}
        theirs = {k: rkey.get(k) for k in ours}
        diff = [f"{k}: {ours[k]!r} (student's run) vs {theirs[k]!r} (reference)" for k in ours
                if ours[k] is not None and ours[k] != theirs[k]]
        if diff:
            raise input_error(f"reference={ref}: made with other teacher settings than the student's run "
                              f"{run_path} ({'; '.join(diff)}); allowed: the reference of the student's own solver, "
                              f"N and guidance, or allow_reference_mismatch=true")

    run_labels = {k: v for k, v in (("method", run.get("distill", {}).get("method")),
                                    ("solver", run.get("distill", {}).get("solver"))) if v is not None}
    for k, given in (("method", cfg.method), ("solver", cfg.solver)):
        if given is not None and k in run_labels and given != run_labels[k]:
            raise input_error(f"{k}={given}: the student's run {run_path} says distill.{k}={run_labels[k]!r}; "
                              f"allowed: omit {k} (read from the run) or give the run's value")
    labels = {**run_labels, **{k: v for k, v in (("method", cfg.method), ("solver", cfg.solver)) if v}}

    model = EvalModelConfig(pretrained=rmodel["pretrained"], vae=rmodel.get("vae"),
                            dtype=cfg.model.dtype or rmodel.get("dtype", "bf16"),
                            vae_dtype=cfg.model.vae_dtype or rmodel.get("vae_dtype"), timestep_offset=offset)
    plan = SamplePlan(ref, rman, captions, model, cache_dir, offset, labels, {}, run)
    ref_digest = hashlib.sha256(json.dumps(rkey, sort_keys=True).encode()).hexdigest()[:16]
    plan.key = {"reference": ref_digest, "weights": weights_fingerprint(cfg.weights), "kind": cfg.kind,
                "method": labels.get("method"), "solver": labels.get("solver"), "timestep_offset": offset,
                "renoise_seed": cfg.renoise_seed, "dtype": model.dtype, "boundary": list(plan.boundary)}
    folder_key_check("out_dir", Path(cfg.out_dir), "student_samples", plan.key)
    return plan


# ------------------------------------------------------------------------------------------- model
def load_student_bundle(cfg: SampleConfig, plan: SamplePlan, device: torch.device):
    """Load text encoders, VAE and UNet once (the reference's model, in the resolved indexing); put the
    student's weights on it.

    LoRA: ``unet.load_lora_adapter(weights)`` (diffusers' API); full: the student's ``unet/`` folder.
    ``weights=None`` uses the teacher's UNet as the student (only useful for smoke runs)."""
    from odecm.consistency import LCMBoundary

    from .student import SDXLStudent
    from .teacher import load_sdxl, resolve_dtype

    m = plan.model
    parts = load_sdxl(resolve_model(m, plan.cache_dir), vae=m.vae, dtype=m.dtype, vae_dtype=m.vae_dtype, device=device)
    bundle = SDXLBundle(parts, m.timestep_offset, device)
    boundary = LCMBoundary(*plan.boundary, t_min=0.0)
    if cfg.kind == "lora":
        if cfg.weights is not None:
            p = Path(cfg.weights)
            folder, name = (p.parent, p.name) if p.is_file() else (p, "pytorch_lora_weights.safetensors")
            parts.unet.load_lora_adapter(str(folder), weight_name=name, prefix="unet", adapter_name="default")
        student = SDXLStudent(parts.unet, bundle.schedule, "lora", boundary, prediction_type=bundle.prediction_type)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(Path(cfg.weights) / "unet", torch_dtype=resolve_dtype(m.dtype))
        unet = unet.to(device).requires_grad_(False).eval()
        student = SDXLStudent(unet, bundle.schedule, "full", boundary, teacher_unet=parts.unet,
                              prediction_type=bundle.prediction_type,
                              w_embedding_dim=unet.config.get("time_cond_proj_dim"))
    return bundle, student.eval()


# ------------------------------------------------------------------------------------------- run
def run_sample(cfg: SampleConfig, loader: Callable[[], tuple[SDXLBundle, Any]] | None = None) -> tuple[Path, dict]:
    """Write k-step student samples for every k in ``cfg.steps``; captions already done are skipped."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from .features_cache import _state, save_images

    plan = plan_sample(cfg)
    state = _state()
    out = Path(cfg.out_dir)
    captions, offset = plan.captions, plan.offset
    n = len(captions)
    resolution = int(plan.ref_manifest["key"]["resolution"])
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    steps = sorted(set(previous.get("steps", [])) | set(cfg.steps))
    manifest = {"kind": "student_samples", "key": plan.key, "reference": str(plan.reference), "weights": cfg.weights,
                "labels": plan.labels, "timestep_offset": offset, "steps": steps,
                "timesteps": {str(k): student_timesteps(k, offset) for k in steps},
                "run_config": str(find_run_config(cfg.weights)[0] or ""), "config": cfg.model_dump(mode="json")}
    todo = {k: plan_shards(n, cfg.shard_size, done_indices(out / f"k{k}", True) if (out / f"k{k}").is_dir() else set())
            for k in cfg.steps}
    stats = {"student_calls": 0, "captions_computed": {k: 0 for k in cfg.steps}, "timestep_offset": offset,
             "timesteps": {k: student_timesteps(k, offset) for k in cfg.steps}}
    state.wait_for_everyone()  # every process planned from the same files
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(manifest_path, manifest)
    if not any(todo.values()):
        return out, stats

    device = _device(cfg.device)
    bundle, student = loader() if loader is not None else load_student_bundle(cfg, plan, device)
    noise = load_file(plan.ref_manifest["noise_file"])["noise"]
    calls = [0]

    def counted(x, t, cond):
        calls[0] += 1
        with torch.no_grad():
            return student(x, t, cond)

    for k in cfg.steps:
        ts = student_timesteps(k, offset)
        mine = [j for j in range(len(todo[k])) if j % state.num_processes == state.process_index]
        for j in tqdm(mine, desc=f"student k={k} {ts}", disable=not cfg.progress):
            idx, outs = todo[k][j], []
            for b in range(0, len(idx), cfg.batch_size):
                bi = idx[b:b + cfg.batch_size]
                cond = bundle.cond([captions[i] for i in bi], resolution)
                z = [torch.stack([torch.randn(noise.shape[1:], generator=torch.Generator().manual_seed(
                    _caption_seed(cfg.renoise_seed, i, stream=1 + jj))) for i in bi]).to(device) for jj in range(k - 1)]
                lat = multistep_sample(counted, bundle.schedule, noise[bi].to(device), ts, cond, z).float()
                save_images(latents_to_images(bundle.parts.vae, lat), [image_path(out / f"k{k}", i) for i in bi])
                outs.append(lat.cpu())
            write_latent_shard(shard_path(out / f"k{k}", idx), torch.cat(outs), idx)
            stats["captions_computed"][k] += len(idx)
    stats["student_calls"] = calls[0]
    state.wait_for_everyone()
    return out, stats


def main(argv=None) -> None:
    cfg = cli_config(SampleConfig, argv, "Student k-step samples from the reference's shared noise.",
                     prog="python -m sdxl.sample", door=plan_sample)
    if cfg is None:  # --check
        return
    out, stats = run_sample(cfg)
    print(json.dumps({"out_dir": str(out), **stats}, default=str))


if __name__ == "__main__":
    from odecm.cli import run_main

    run_main(main)
