"""``load_student_pipeline``: a stock diffusers pipeline samples a student on its training grid.

LCMScheduler's k-step timesteps come from ``original_inference_steps`` evenly spaced training
timesteps; diffusers' default (50) gives [999, 759, 499, 259] for k = 4, two points off an N = 100
student's grid. The saved student's ``odecm_student.json`` carries N, so the pipeline samples at
[999, 749, 499, 249]; a student trained with the paper's indexing (offset 1) gets a warning that
diffusers' timesteps run one index early.
"""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")


def _saved_student(folder, tiny_sdxl_dir, grid_size: int, offset: int):
    from diffusers import UNet2DConditionModel

    from sdxl.student import add_lora, save_lora, write_student_info

    unet = add_lora(UNet2DConditionModel.from_pretrained(str(tiny_sdxl_dir), subfolder="unet"), 4, 4)
    save_lora(unet, folder)
    cfg = SimpleNamespace(
        distill=SimpleNamespace(grid_size=grid_size, grid="skip", method="cd", solver="ddim"),
        model=SimpleNamespace(timestep_offset=offset, pretrained=str(tiny_sdxl_dir)),
        student=SimpleNamespace(kind="lora", sigma_data=0.5, timestep_scaling=10.0),
        teacher=SimpleNamespace(guidance_scale=9.0, cfg_convention="imagen"))
    write_student_info(folder, cfg)
    return folder


def test_pipeline_samples_on_the_training_grid(tmp_path, tiny_sdxl_dir):
    from sdxl.student import load_student_pipeline

    lora = _saved_student(tmp_path / "lora", tiny_sdxl_dir, grid_size=100, offset=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # diffusers indexing: no warning
        pipe = load_student_pipeline(str(tiny_sdxl_dir), lora=lora)
    assert pipe.scheduler.config.original_inference_steps == 100
    for k, expected in ((1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])):
        pipe.scheduler.set_timesteps(k)
        assert pipe.scheduler.timesteps.tolist() == expected


def test_paper_indexed_student_gets_a_warning_and_diffusers_default_is_off_grid(tmp_path, tiny_sdxl_dir):
    from diffusers import LCMScheduler

    from sdxl.student import load_student_pipeline, read_student_info

    lora = _saved_student(tmp_path / "lora", tiny_sdxl_dir, grid_size=100, offset=1)
    assert read_student_info(lora)["timestep_offset"] == 1
    with pytest.warns(UserWarning, match="one index early"):
        pipe = load_student_pipeline(str(tiny_sdxl_dir), lora=lora)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    stock = LCMScheduler.from_config(json.loads((tiny_sdxl_dir / "scheduler" / "scheduler_config.json").read_text()))
    stock.set_timesteps(4)
    assert stock.timesteps.tolist() == [999, 759, 499, 259]  # what the pipeline did before
