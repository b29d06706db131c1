"""SDXL distillation end to end on a tiny random SDXL-architecture model (CPU).

CD and Direct CD train through odecm's objectives and Trainer; checkpoints resume bitwise; the
saved LoRA loads into a stock diffusers pipeline whose LCMScheduler 1-step sample equals the
student consistency function f(x_T, T); precomputed Direct CD targets equal a fresh teacher solve;
config errors name the bad key.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
pytest.importorskip("peft")

from odecm.config import ConfigError  # noqa: E402
from odecm.solvers import solve  # noqa: E402
from sdxl.train import train  # noqa: E402
from sdxl.train_config import CONFIG_DIR, load_train_config  # noqa: E402
from sdxl.tiny import TINY_SIZES  # noqa: E402

L = TINY_SIZES["latent_size"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """8 captioned PNGs of mixed sizes (crops and original sizes differ) + 1 corrupt file."""
    from sdxl.data import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("images")
    make_synthetic_dataset(folder, 8, size=[(40, 48), (36, 36), (48, 40)], seed=0, corrupt=1)
    return folder


def _cfg(out, tiny_sdxl_dir, image_dir, *extra):
    """tiny_cpu with these test defaults; ``extra`` overrides replace defaults of the same key
    (a key given twice on one command line is an error)."""
    base = [f"out_dir={out}", f"model.pretrained={tiny_sdxl_dir}", "data.source=images", f"data.path={image_dir}",
            "data.crop=random", "distill.checkpoint_every=2", "keep_checkpoints=3", "log_with=none"]
    given = {e.split("=", 1)[0] for e in extra}
    return load_train_config("tiny_cpu", [b for b in base if b.split("=", 1)[0] not in given] + list(extra))


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory, tiny_sdxl_dir, image_dir):
    out = tmp_path_factory.mktemp("cd")
    cfg = _cfg(out, tiny_sdxl_dir, image_dir)
    metrics = train(cfg)
    return out, cfg, metrics


def test_cd_trains_logs_and_saves(cd_run):
    out, cfg, metrics = cd_run
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in log)
    assert all(r["target_calls"] == 1 and r["target_evals"] == 4 and r["target_steps"] == 1 for r in log)
    assert all(1 <= r["n_mean"] <= r["n_max"] <= 10 for r in log)
    assert metrics["steps"] == 3 and metrics["images_per_second"] > 0
    assert json.loads((out / "config.json").read_text())["distill"]["method"] == "cd"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]
    from safetensors.torch import load_file

    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in k or "lora.up" in k for k in lora)
    assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k or "lora.up" in k) > 0  # trained


def test_resume_latest_continues_exactly(cd_run, tmp_path, tiny_sdxl_dir, image_dir):
    out, cfg, _ = cd_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000003")
    (resumed / "checkpoints" / "latest").write_text("step_0000002")
    shutil.rmtree(resumed / "lora")
    cfg2 = _cfg(resumed, tiny_sdxl_dir, image_dir)
    metrics = train(cfg2, resume="latest")
    assert metrics["this_segment"]["resumed_from_step"] == 2 and metrics["this_segment"]["steps"] == 1
    assert metrics["steps"] == 3 and metrics["segments"] == 2  # the whole run, not the last segment
    a, b = _log(out), _log(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], rel=1e-5)
    assert b[2]["n_mean"] == a[2]["n_mean"]
    from safetensors.torch import load_file

    la = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(resumed / "lora" / "pytorch_lora_weights.safetensors"))
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=1e-5, atol=1e-7)


def test_saved_lora_samples_with_stock_pipeline(cd_run, tiny_sdxl_dir):
    from sdxl.student import load_student, load_student_pipeline
    from sdxl.teacher import make_time_ids

    out, _, _ = cd_run
    pipe = load_student_pipeline(str(tiny_sdxl_dir), lora=out / "lora")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    student = load_student(str(tiny_sdxl_dir), out / "lora")
    pe, _, pooled, _ = pipe.encode_prompt(["a red square"], device="cpu", do_classifier_free_guidance=False)
    cond = {"prompt_embeds": pe, "text_embeds": pooled, "time_ids": make_time_ids(1, (32, 32), (0, 0), (32, 32))}
    x = torch.randn(1, 4, L, L, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, guidance_scale=1.0, height=32, width=32)
    one = pipe(num_inference_steps=1, latents=x.clone(), output_type="latent", **kw).images
    with torch.no_grad():
        f = student(x, torch.tensor([999.0]), cond)
    torch.testing.assert_close(one, f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))
    four = pipe(num_inference_steps=4, latents=x.clone(), output_type="latent", **kw).images
    assert torch.isfinite(four).all() and (four - one).abs().max() > 1e-3
    images = pipe(num_inference_steps=4, latents=x.clone(), output_type="np", **kw).images
    assert images.shape == (1, 32, 32, 3)
    # the LoRA changes the model: without it the 1-step output differs
    pipe.unload_lora_weights()
    base = pipe(num_inference_steps=1, latents=x.clone(), output_type="latent", **kw).images
    assert (base - one).abs().max() > 1e-4


def test_direct_cd_full_mask_solves_from_batch_max(tmp_path, tiny_sdxl_dir, image_dir):
    """Scheme (a): the whole batch goes through every step from max n down to 0 (masked updates)."""
    out = tmp_path / "dcd"
    train(_cfg(out, tiny_sdxl_dir, image_dir, "distill.method=direct_cd", "distill.mask_mode=full"))
    for r in _log(out):
        assert r["target_steps"] == r["n_max"] == r["target_calls"]
        assert r["target_evals"] == 4 * r["n_max"]
        assert torch.isfinite(torch.tensor(r["loss"]))
        # one adapter switch each way per iteration; switching around every teacher call: 2 per call
        assert r["adapter_toggles"] == 2 and r["adapter_toggles_per_call"] == 2 * r["target_calls"]


def test_direct_cd_shared_index(tmp_path, tiny_sdxl_dir, image_dir):
    """Scheme (b): one n per batch, so depth = n and only the needed evaluations happen."""
    out = tmp_path / "shared"
    train(_cfg(out, tiny_sdxl_dir, image_dir, "distill.method=direct_cd", "distill.index_scheme=shared",
               "distill.train_steps=2", "save_student=false"))
    for r in _log(out):
        assert r["n_mean"] == r["n_max"] == r["target_steps"]
        assert r["target_evals"] == 4 * r["n_max"]


def test_precomputed_targets_match_teacher_and_train(tmp_path, tiny_sdxl_dir, image_dir):
    """Scheme (c): stored endpoints equal a fresh subset-mode teacher solve; training reuses them."""
    from sdxl.precompute_targets import TargetDataset, precompute
    from sdxl.teacher import load_sdxl, make_teacher
    from odecm.grids import skip

    out = tmp_path / "pre"
    cfg = _cfg(out, tiny_sdxl_dir, image_dir, "distill.method=direct_cd", "distill.mask_mode=full",
               "precompute.batch_size=4", "precompute.shard_size=4", "data.crop=center")
    folder = precompute(cfg, progress=False)
    ds = TargetDataset(folder)
    assert len(ds) == 8 and len(ds.files) == 3  # 9 files (one unreadable: skipped, not substituted)
    assert ds.index["skipped_unreadable"] == 1
    parts = load_sdxl(str(tiny_sdxl_dir), text_encoders=False, load_vae=False)
    teacher = make_teacher(parts.unet, parts.schedule, 9.0, "imagen")
    items = [ds[i] for i in (0, 5)]
    x = torch.stack([it["x_tn"] for it in items])
    n = torch.stack([it["n"] for it in items])
    cond = {k: torch.stack([it[k] for it in items]) for k in ("prompt_embeds", "text_embeds", "time_ids")}
    with torch.no_grad():
        ref = solve("ddim", teacher, x, skip(parts.schedule, 10), n, cond, mask_mode="subset").x
    torch.testing.assert_close(torch.stack([it["target"] for it in items]), ref, rtol=1e-4, atol=1e-4)
    run_out = tmp_path / "from_targets"
    train(_cfg(run_out, tiny_sdxl_dir, image_dir, "distill.method=direct_cd", "data.source=targets",
               f"data.path={folder}", "distill.train_steps=2", "save_student=false"))
    log = _log(run_out)
    assert len(log) == 2 and all(r["target_calls"] == 0 for r in log)


def test_bad_config_key_is_named():
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny_cpu", ["distill.solverr=ddim"])
    assert "distill.solverr" in str(err.value) and "solver" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny_cpu", ["teacher.cfg_convention=original"])
    assert "teacher.cfg_convention" in str(err.value) and "imagen" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny_cpu", ["speed.precision=bf16"])
    assert "speed.precision" in str(err.value) and "mixed_precision" in str(err.value)
    with pytest.raises(ConfigError, match="distill.method='direct_cd'"):
        load_train_config("tiny_cpu", ["data.source=targets", "data.path=x"])


@pytest.mark.parametrize("method", ["cd", "direct_cd"])
@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_paper_configs(method, solver):
    """The six shipped paper runs: the paper's VP Euler / Heun (not EDM's, whose Euler is DDIM), the
    paper's indexing and the hyperparameters of its scripts (weight decay 1e-2, fp16 + fp16-fix VAE, seed 24)."""
    cfg = load_train_config(CONFIG_DIR / f"{method}_{solver}.yaml")
    d = cfg.distill
    paper_solver = {"ddim": "ddim", "euler": "euler_vp", "heun": "heun_vp"}[solver]
    assert (d.method, d.solver, d.grid_size, d.grid, d.distance, d.batch_size, d.train_steps) == (
        method, paper_solver, 100, "skip", "l2", 16, 250)
    assert cfg.model.timestep_offset == 1 and d.seed == 24
    assert d.target.policy == "stopgrad" and d.optim.lr == 1e-4 and d.optim.name == "adamw8bit"
    assert d.optim.weight_decay == 1e-2 and d.optim.grad_clip == 1.0 and d.optim.warmup_steps == 0
    assert (cfg.speed.mixed_precision, cfg.model.dtype, cfg.model.vae, cfg.model.vae_dtype) == (
        "fp16", "fp16", "madebyollin/sdxl-vae-fp16-fix", "fp16")
    assert (cfg.teacher.guidance_scale, cfg.teacher.cfg_convention, cfg.teacher.uncond) == (9.0, "imagen", "zeros")
    assert (cfg.student.kind, cfg.student.lora_rank, cfg.student.lora_alpha) == ("lora", 64, 64)
    assert cfg.data.resolution == 1024 and cfg.data.crop == "random" and not cfg.data.flip
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert d.mask_mode == ("full" if method == "direct_cd" else "subset")


def test_paper_solvers_differ_from_ddim():
    """The six runs are six distinct solver x method pairs: no two paper configs name the same solver
    for one method, and none of the Euler ones is the EDM Euler that equals DDIM."""
    from odecm.solvers import get_solver

    for method in ("cd", "direct_cd"):
        solvers = [load_train_config(CONFIG_DIR / f"{method}_{s}.yaml").distill.solver for s in ("ddim", "euler", "heun")]
        assert len(set(solvers)) == 3
        assert all(get_solver(s).equivalent_to is None for s in solvers)


def test_full_student_with_w_embedding_and_ema_target(tmp_path, tiny_sdxl_dir, image_dir):
    """Full-UNet student (guidance-conditioned via a w embedding) with an EMA target: the EMA copy
    shares the frozen teacher UNet, starts equal to the student and lags behind it."""
    from sdxl.build import build_run
    from sdxl.loss import make_loss_fn
    from odecm.training import Trainer, TrainerConfig

    cfg = _cfg(tmp_path / "full", tiny_sdxl_dir, image_dir, "student.kind=full", "student.w_embedding_dim=16",
               "distill.target.policy=ema", "distill.target.ema_rate=0.5", "distill.train_steps=1")
    run = build_run(cfg)
    s = run.student
    assert s.kind == "full" and s.unet is not s.teacher_unet
    assert run.target.module.teacher_unet is s.teacher_unet  # shared, not copied
    assert s.unet.config.time_cond_proj_dim == 16
    x = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 499.0])
    cond = {"prompt_embeds": torch.randn(2, 77, 64), "text_embeds": torch.randn(2, 32), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():  # zero-initialised w projection: the student starts as the teacher's x0 network
        f = s(x, t, cond)
        x0_teacher = s.teacher(guidance_scale=1.0)(x, t, cond).x0
        c_skip, c_out = s.boundary.scalings(t)
        torch.testing.assert_close(f, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0_teacher,
                                   rtol=1e-4, atol=1e-4)
    name = "unet.conv_in.weight"
    before = dict(s.named_parameters())[name].detach().clone()
    trainer = Trainer(run.student_fn, run.optimizer, make_loss_fn(run), tmp_path / "full",
                      TrainerConfig(train_steps=1, progress=False, grad_clip=None), target=run.target)
    trainer.run()
    after_student = dict(s.named_parameters())[name].detach()
    after_target = dict(run.target.module.named_parameters())[name].detach()
    assert (after_student - before).abs().max() > 0
    torch.testing.assert_close(after_target, 0.5 * before + 0.5 * after_student)


def test_lora_targets_match_lcm_lora_sdxl_size():
    """On SDXL base's real architecture (meta device, no weights) r = 64 on the paper's modules gives
    LCM-LoRA-SDXL's 196,751,360 adapter parameters."""
    from diffusers import UNet2DConditionModel

    from benchmarks.sdxl_step import SDXL_BASE_UNET_CONFIG
    from sdxl.student import add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    add_lora(unet, 64, 64)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 196_751_360
