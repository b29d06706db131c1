"""The teacher / student switch on one LoRA UNet (``sdxl.teacher.AdapterSwitch``), tiny SDXL on CPU.

* The switch's two states are exactly diffusers' ``disable_adapters()`` (the teacher) and the adapted
  UNet (the student).
* Per iteration the UNet switches once each way, whatever the solver and depth: CD with DDIM or the
  paper's Heun, and Direct CD over the whole grid; switching around every teacher call cost 2 x
  teacher calls.
* A gradient-checkpointed backward re-runs the student's forward with the flags as they are then: a
  loss that ends with the adapters on (as ``sdxl.loss`` ensures) gives the gradients of an
  uncheckpointed backward; left off, torch's checkpoint refuses the recomputation (shown).
* An off/on pair costs far less than diffusers' walk over every module (``benchmarks.sdxl_flops.switch_cost``).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_thread")

from odecm.grids import make_grid  # noqa: E402
from odecm.objectives import CDTarget, DirectCDTarget, consistency_loss  # noqa: E402
from odecm.schedules import sdxl_schedule  # noqa: E402
from odecm.solvers import get_solver  # noqa: E402
from odecm.training import EMATarget  # noqa: E402
from sdxl.student import SDXLStudent, add_lora  # noqa: E402
from sdxl.teacher import adapter_switch, make_teacher  # noqa: E402
from sdxl.tiny import TINY_SIZES  # noqa: E402

L = TINY_SIZES["latent_size"]


def _lora_unet(checkpointing: bool = False):
    from sdxl.tiny import tiny_sdxl_pipeline

    unet = add_lora(tiny_sdxl_pipeline(0).unet, 4, 4)
    torch.manual_seed(1)
    with torch.no_grad():  # B != 0: the adapter changes the output
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _cond(B: int) -> dict:
    g = torch.Generator().manual_seed(3)
    h = TINY_SIZES["hidden"]
    return {"prompt_embeds": torch.randn(B, 77, 2 * h, generator=g), "text_embeds": torch.randn(B, h, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * B)}


@pytest.fixture(scope="module")
def unet():
    return _lora_unet()


def test_switch_states_are_diffusers_disable_and_the_adapted_unet(unet):
    x, t, cond = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 400.0]), _cond(2)
    kw = dict(encoder_hidden_states=cond["prompt_embeds"],
              added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
    switch = adapter_switch(unet)
    with torch.no_grad():
        adapted = unet(x, t, **kw).sample
        unet.disable_adapters()
        base = unet(x, t, **kw).sample
        unet.enable_adapters()
        switch.set(False)
        off = unet(x, t, **kw).sample
        switch.set(True)
        on = unet(x, t, **kw).sample
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(off, base) and torch.equal(on, adapted)


@pytest.mark.parametrize("method, solver", [("cd", "ddim"), ("cd", "heun_vp"), ("direct_cd", "ddim")])
def test_one_switch_each_way_per_iteration(unet, method, solver):
    schedule = sdxl_schedule()
    student = SDXLStudent(unet, schedule, "lora")
    teacher = make_teacher(unet, schedule, 9.0, "imagen", "zeros", base_model=True)
    grid = make_grid("skip", schedule, 10)
    provider = (CDTarget(teacher, get_solver(solver), grid, EMATarget(student, 0.0)) if method == "cd"
                else DirectCDTarget(teacher, get_solver(solver), grid, mask_mode="full"))
    switch = adapter_switch(unet)
    x0, n = torch.randn(3, 4, L, L, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 4, 7])
    for _ in range(2):
        before = switch.toggles
        with torch.no_grad():
            terms = consistency_loss(student, provider, x0, n, grid, schedule, cond=_cond(3),
                                     generator=torch.Generator().manual_seed(2))
        assert switch.toggles - before == 2 and switch.enabled
        per_call = 2 * terms["target_calls"]
        assert per_call == {"ddim": 2, "heun_vp": 4}[solver] if method == "cd" else per_call == 2 * 10


def _grads(unet, finish_on: bool) -> dict[str, torch.Tensor]:
    """Student forward, then a teacher call (adapters off), then backward."""
    schedule = sdxl_schedule()
    student = SDXLStudent(unet, schedule, "lora")
    teacher = make_teacher(unet, schedule, 9.0, "imagen", "zeros", base_model=True)
    x, t, cond = torch.randn(2, 4, L, L, generator=torch.Generator().manual_seed(5)), torch.tensor([999.0, 300.0]), _cond(2)
    unet.train()
    pred = student(x, t, cond)
    with torch.no_grad():
        target = teacher(x, t, cond).x0
    if finish_on:
        adapter_switch(unet).set(True)
    (pred - target).pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    adapter_switch(unet).set(True)
    return grads


def test_checkpointed_backward_needs_the_adapters_on():
    plain = _grads(_lora_unet(checkpointing=False), finish_on=False)  # no recomputation: state irrelevant
    ckpt = _lora_unet(checkpointing=True)
    good = _grads(ckpt, finish_on=True)
    assert plain.keys() == good.keys() and len(good) > 0
    for k in plain:
        torch.testing.assert_close(good[k], plain[k], rtol=1e-4, atol=1e-7)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # recomputed without the LoRA: another graph
        _grads(ckpt, finish_on=False)
    ckpt.zero_grad(set_to_none=True)
    adapter_switch(ckpt).set(True)


def test_switch_pair_costs_a_fraction_of_diffusers_walk(unet):
    from benchmarks.sdxl_flops import switch_cost

    cost = switch_cost(unet, repeats=3)
    assert cost["lora_layers"] == 119 and cost["modules"] > 10 * cost["lora_layers"]
    assert cost["adapter_switch_pair_ms"] < cost["diffusers_pair_ms"] / 10
