"""Checkpoints load without pickle: the JSON/safetensors encoding is exact, every optimizer (torch and
bitsandbytes 8-bit) resumes bit for bit, an old pickle checkpoint is refused unopened, and no package
module calls an unsafe loader."""
from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from odecm.checkpoint import LegacyCheckpointError, decode_state, encode_state
from odecm.optim import make_optimizer
from odecm.training import Trainer, TrainerConfig, latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("odecm", "toys", "sdxl", "studies", "benchmarks")


def _same(a, b) -> bool:
    """Exact structural equality (tensors: dtype, shape and bits; floats: bits, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_state_encoding_round_trips_exactly_through_json_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(3)
    state = {
        "ints": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 7: {"q": torch.randint(0, 255, (5,), dtype=torch.uint8)}},
        "groups": [{"lr": 1e-4 / 3, "betas": (0.9, 0.999), "params": [0, 7], "maybe": None, "flag": True}],
        "floats": [float("nan"), float("inf"), -float("inf"), 0.1 + 0.2, 5e-324],
        "bf16": torch.randn(3).to(torch.bfloat16), "f64": torch.randn(2, dtype=torch.float64),
        "generator": gen.get_state(), "python": random.getstate(), "numpy": np.random.get_state(),
        "__tensor__": "a key that looks like a marker", ("a", 1): "tuple key",
    }
    tensors: dict = {}
    encoded = encode_state(state, tensors)
    text = json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN / Infinity literals
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = decode_state(json.loads(text), load_file(str(tmp_path / "t.safetensors")))
    assert _same(back, state)
    random.setstate(back["python"])  # the decoded RNG states are accepted by their owners
    np.random.set_state(back["numpy"])
    with pytest.raises(TypeError, match="state/odd: a object cannot be stored"):
        encode_state({"odd": object()}, {})


def _fit(out: Path, steps: int, opt_factory, resume=None, checkpoint_every=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))  # 4096 weights: 8-bit state
    opt = opt_factory(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def loss_fn(step, gen):
        x = torch.randn(16, 64, generator=gen)
        return {"loss": (model(x) - x[:, :1].sin()).pow(2).mean()}

    cfg = TrainerConfig(train_steps=steps, checkpoint_every=checkpoint_every, progress=False, grad_clip=None)
    trainer = Trainer(model, opt, loss_fn, out, cfg, lr_scheduler=sched)
    trainer.run(resume=resume)
    return trainer, model, opt


OPTIMIZERS = {
    "adam": lambda p: make_optimizer(p, "adam", lr=1e-2),
    "adamw": lambda p: make_optimizer(p, "adamw", lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "adamw8bit": lambda p: make_optimizer(p, "adamw8bit", lr=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_resumes_bit_exactly_without_pickle(tmp_path, name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    _, full_model, full_opt = _fit(tmp_path / "full", 6, OPTIMIZERS[name])
    _fit(tmp_path / "split", 3, OPTIMIZERS[name])
    ck = latest_checkpoint(tmp_path / "split")
    assert sorted(p.name for p in ck.iterdir()) == ["COMPLETE", "state.json", "state.safetensors", "student.safetensors"]
    meta = json.loads((ck / "state.json").read_text())
    assert meta["format"] == "odecm-checkpoint" and meta["step"] == 3
    if name == "adamw8bit":  # the quantised moments and their maps are stored as tensors
        assert '"__bnb_optimizer_quant_state__"' in (ck / "state.json").read_text()
        from safetensors.torch import load_file

        stored = load_file(str(ck / "state.safetensors"))
        assert any(v.dtype == torch.uint8 and v.shape == (64, 64) for v in stored.values())
    torch.manual_seed(999)  # scramble: the checkpoint restores every RNG
    resumed, model, opt = _fit(tmp_path / "split", 6, OPTIMIZERS[name], resume="latest")
    assert resumed.step == 6 and resumed.resumed_from == 3
    for a, b in zip(full_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert _same(opt.state_dict(), full_opt.state_dict())
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"] == 1e-2 * 0.5 ** 3


class _Payload:
    """Unpickling this writes a marker file (stands in for any code a crafted pickle could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_old_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    trainer, model, _ = _fit(tmp_path / "run", 2, OPTIMIZERS["adam"], checkpoint_every=0)
    ck = latest_checkpoint(tmp_path / "run")
    # rewrite the checkpoint in the old format: state.pt (a pickle) instead of state.json
    (ck / "state.json").unlink()
    (ck / "state.safetensors").unlink()
    torch.save({"step": 2, "payload": _Payload(marker)}, ck / "state.pt")
    probe = tmp_path / "probe.pt"  # the payload is live: unpickling it does run code
    torch.save(_Payload(tmp_path / "probe_marker"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_marker").exists()

    with pytest.raises(LegacyCheckpointError, match=r"old pickle format \(state.pt\).*not loaded"):
        _fit(tmp_path / "run", 4, OPTIMIZERS["adam"], resume="latest")
    with pytest.raises(LegacyCheckpointError):
        _fit(tmp_path / "run", 4, OPTIMIZERS["adam"], resume=str(ck))
    assert not marker.exists()


# ------------------------------------------------------------------------- source-level guard
def unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle: torch.load without weights_only=True, pickle / dill / joblib loads,
    numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}

        def true(key):
            return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True

        if name in ("torch.load", "torch.serialization.load", "serialization.load") and not true("weights_only"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") and name.split(".")[-1] in ("load", "loads"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name.split(".")[0] in ("np", "numpy") and true("allow_pickle"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_guard_catches_unsafe_loads():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.serialization.load(p)\n"
           "pickle.loads(b)\nnp.load(p, allow_pickle=True)\n")
    assert len(unsafe_loads(bad)) == 5
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\njson.load(f)\n") == []


def test_no_package_module_can_unpickle():
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            offenders += [f"{path.relative_to(REPO)} {hit}" for hit in unsafe_loads(path.read_text())]
    assert offenders == [], "unsafe loads (use safetensors / JSON, or torch.load(..., weights_only=True)):\n" + "\n".join(offenders)
