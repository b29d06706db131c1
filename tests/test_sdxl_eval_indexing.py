"""Timestep indexing in the SDXL evaluation (issue 10.3): references default to the paper's indexing and end
at clean data; each student is sampled in its own indexing (read from its run's config.json); student,
reference and request must agree."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from odecm.cli import InputError  # noqa: E402
from sdxl import reference as refmod  # noqa: E402
from sdxl.eval_config import EvaluateConfig, ReferenceConfig, SampleConfig, student_timesteps  # noqa: E402
from sdxl.sample import plan_sample, run_sample  # noqa: E402

from sdxl_eval_fakes import fake_reference, fake_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_student_timesteps_per_indexing():
    assert [student_timesteps(k, 1) for k in (1, 2, 4)] == [[1000], [1000, 500], [1000, 750, 500, 250]]
    assert [student_timesteps(k, 0) for k in (1, 2, 4)] == [[999], [999, 499], [999, 749, 499, 249]]
    assert student_timesteps(8, 1) == [1000, 875, 750, 625, 500, 375, 250, 125]


def test_defaults_are_the_papers():
    assert ReferenceConfig(captions="c.txt").model.timestep_offset == 1
    assert SampleConfig(reference="r").model.timestep_offset is None  # from the student's run
    assert EvaluateConfig(samples="s").fd_protocol == "paper"


def test_paper_reference_ends_at_clean_data(tmp_path, tiny_sdxl_dir):
    """Golden: diffusers' DDIM arithmetic (trailing 999, 499; final alpha = 1, i.e. clean data) with the UNet fed
    the paper's timesteps t + 1 = 1000, 500; the diffusers-indexed reference ends at alphas_cumprod[0] instead."""
    from diffusers import DDIMScheduler

    (tmp_path / "c.txt").write_text("a red cat\na blue dog\n")
    common = dict(grid_size=2, captions=str(tmp_path / "c.txt"), resolution=16, batch_size=2,
                  cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    cfg = ReferenceConfig(model={"pretrained": str(tiny_sdxl_dir), "dtype": "fp32"}, **common)
    bundle = refmod.load_bundle(cfg.model, cfg.cache_dir, torch.device("cpu"))
    seen = []
    hook = bundle.parts.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].flatten()[0].item()))
    folder, _ = refmod.run_reference(cfg, loader=lambda: bundle)
    hook.remove()
    assert sorted(set(seen)) == [500.0, 1000.0]  # the UNet saw the paper's timesteps
    _, z = refmod.read_latents(folder, 2)

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [999, 499]
    x = refmod.shared_noise(cfg.cache_dir, 0, 2, (4, 8, 8))[0].clone()
    cond = bundle.cond(["a red cat", "a blue dog"], 16)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = bundle.parts.unet(torch.cat([x, x]), t + 1, encoder_hidden_states=torch.cat(
                [cond["prompt_embeds"], 0 * cond["prompt_embeds"]]), added_cond_kwargs={
                "text_embeds": torch.cat([cond["text_embeds"], 0 * cond["text_embeds"]]),
                "time_ids": torch.cat([cond["time_ids"], cond["time_ids"]])}).sample
            e_c, e_u = eps.chunk(2)
            x = sched.step(e_u + 9.0 * (e_c - e_u), t, x).prev_sample
    assert torch.allclose(z, x, atol=1e-4, rtol=1e-4)

    cfg0 = ReferenceConfig(model={"pretrained": str(tiny_sdxl_dir), "dtype": "fp32", "timestep_offset": 0}, **common)
    bundle0 = refmod.load_bundle(cfg0.model, cfg0.cache_dir, torch.device("cpu"))
    folder0, _ = refmod.run_reference(cfg0, loader=lambda: bundle0)
    assert folder0 != folder
    assert (refmod.read_latents(folder0, 2)[1] - z).abs().max() > 1e-3  # not the same end point


def test_student_sampled_in_its_own_indexing(tmp_path, tiny_sdxl_dir):
    from sdxl.student import SDXLStudent

    (tmp_path / "c.txt").write_text("a red cat\n")
    cfg = ReferenceConfig(model={"pretrained": str(tiny_sdxl_dir), "dtype": "fp32"}, grid_size=1,
                          captions=str(tmp_path / "c.txt"), resolution=16, cache_dir=str(tmp_path / "cache"),
                          progress=False, device="cpu")
    bundle = refmod.load_bundle(cfg.model, cfg.cache_dir, torch.device("cpu"))
    ref, _ = refmod.run_reference(cfg, loader=lambda: bundle)
    student = SDXLStudent(bundle.parts.unet, bundle.schedule, "lora")
    seen = []
    hook = bundle.parts.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].flatten()[0].item()))
    out, stats = run_sample(SampleConfig(reference=str(ref), steps=[1, 2, 4], out_dir=str(tmp_path / "s"),
                                         progress=False, device="cpu"), loader=lambda: (bundle, student))
    hook.remove()
    assert seen == [1000.0, 1000.0, 500.0, 1000.0, 750.0, 500.0, 250.0]
    man = json.loads((out / "manifest.json").read_text())
    assert man["timestep_offset"] == 1 and man["timesteps"] == {"1": [1000], "2": [1000, 500], "4": [1000, 750, 500, 250]}
    # k = 1 is f_theta(x_T, 1000) of the paper-indexed consistency function
    noise = refmod.shared_noise(cfg.cache_dir, 0, 1, (4, 8, 8))[0]
    with torch.no_grad():
        expected = student(noise, torch.full((1,), 1000.0), bundle.cond(["a red cat"], 16))
    assert torch.allclose(refmod.read_latents(out / "k1", 1)[1], expected, atol=1e-5)


def test_indexing_disagreement_names_all_three(tmp_path):
    ref = fake_reference(tmp_path / "ref", offset=0)
    lora = fake_run(tmp_path / "run", offset=1)
    with pytest.raises(InputError) as err:
        plan_sample(SampleConfig(reference=str(ref), weights=str(lora), out_dir=str(tmp_path / "out")))
    msg = str(err.value)
    assert f"student=1 ({tmp_path / 'run' / 'config.json'})" in msg and "reference=0" in msg and "request=unset" in msg
    # the request alone cannot reconcile them, and agreeing values pass (labels and indexing from the run)
    with pytest.raises(InputError, match="request=0"):
        plan_sample(SampleConfig(reference=str(ref), weights=str(lora), model={"timestep_offset": 0},
                                 out_dir=str(tmp_path / "out")))
    ref1 = fake_reference(tmp_path / "ref1", offset=1)
    plan = plan_sample(SampleConfig(reference=str(ref1), weights=str(lora), out_dir=str(tmp_path / "out")))
    assert plan.offset == 1 and plan.labels == {"method": "cd", "solver": "ddim"} and plan.model.timestep_offset == 1
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_indexing_read_from_student_info_next_to_the_lora(tmp_path):
    """A LoRA folder copied without its run keeps ``odecm_student.json`` (sdxl.train writes it): that is enough."""
    ref = fake_reference(tmp_path / "ref", offset=1)
    lora = fake_run(tmp_path / "copied", config=False)
    (lora / "odecm_student.json").write_text(json.dumps({
        "grid_size": 10, "timestep_offset": 0, "sigma_data": 0.5, "timestep_scaling": 10.0, "method": "direct_cd",
        "solver": "heun_vp", "guidance_scale": 9.0, "cfg_convention": "imagen", "model": "tiny"}))
    with pytest.raises(InputError, match=r"student=0 \(.*odecm_student.json\), reference=1"):
        plan_sample(SampleConfig(reference=str(ref), weights=str(lora), out_dir=str(tmp_path / "out")))
    ref_heun = fake_reference(tmp_path / "ref0", offset=0, solver="heun_vp")
    plan = plan_sample(SampleConfig(reference=str(ref_heun), weights=str(lora), out_dir=str(tmp_path / "out")))
    assert plan.offset == 0 and plan.labels == {"method": "direct_cd", "solver": "heun_vp"}
