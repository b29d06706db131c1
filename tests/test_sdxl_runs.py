"""Runs that never mix, resumes that refuse config changes, whole-run bookkeeping (tiny SDXL, CPU).

One finished run (``first``: tiny_cpu on images with one unreadable file, TensorBoard, validation
images) is built at module start into an empty odecm cache, so it also builds the tiny model. Then:
re-running into its folder is refused and changes nothing; ``--resume latest`` on it reports it
finished and leaves every file as it was, and one whose final LoRA or metrics were lost (killed after
the last checkpoint) gets them written from that checkpoint, equal to the uninterrupted run's; a resume
with another learning rate or solver is refused listing both keys, and accepted with ``--allow-change``
(noted in config.json) together with more training steps, after which metrics.json describes the whole
run; ``--overwrite`` gives a fresh run
whose losses equal the first run's, although this one found the tiny model cached (the seed is set
after the model is built, so the first run of tiny_cpu and every later one agree).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

from odecm.config import ConfigError  # noqa: E402
from odecm.runs import ConfigChangeError, RunDirError  # noqa: E402


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odecm_cache")
    with pytest.MonkeyPatch.context() as mp:  # restored afterwards
        mp.setenv("ODECM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from sdxl.data import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("images")
    make_synthetic_dataset(folder, 8, size=[(40, 48), (36, 36)], seed=0, corrupt=1)
    return folder


def _argv(out: Path, images: Path, *extra: str) -> list[str]:
    sets = [f"out_dir={out}", "data.source=images", f"data.path={images}", "data.crop=random",
            "distill.train_steps=2", "distill.checkpoint_every=1", "log_with=tensorboard", "validation.every=2",
            "validation.prompts=[a red cube,two blue circles]", "validation.steps=[1,4]"]
    given = {e.split("=", 1)[0] for e in extra if "=" in e and not e.startswith("--")}
    flags = [e for e in extra if e.startswith("--") or "=" not in e]
    return ["--config", "tiny_cpu", "--set", *[s for s in sets if s.split("=", 1)[0] not in given],
            *[e for e in extra if e not in flags], *flags]


def _main(argv: list[str]) -> tuple[dict, str]:
    from sdxl.train import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = main(argv)
    return metrics, stdout.getvalue()


@pytest.fixture(scope="module")
def first(tmp_path_factory, cache, images):
    out = tmp_path_factory.mktemp("runs") / "first"
    assert not any(cache.iterdir())
    metrics, printed = _main(_argv(out, images))
    return out, metrics, printed


def test_first_run_built_the_tiny_model_and_reports_where_everything_is(first, cache):
    out, metrics, printed = first
    assert (cache / "tiny_sdxl_seed0" / "model_index.json").exists()
    assert not (out / "tiny_sdxl").exists()  # the run folder holds only the run
    lines = printed.strip().splitlines()
    summary = next(ln for ln in lines if ln.startswith("[sdxl.train]"))
    assert "2 steps" in summary and "s/it" in summary and f"final loss {metrics['final_loss']:.6g}" in summary
    for key in ("student", "checkpoints", "log", "tensorboard", "validation", "metrics"):
        assert any(ln.strip().startswith(key + ":") for ln in lines), key
    o = metrics["outputs"]
    assert Path(o["student"]).exists() and Path(o["latest_checkpoint"]).name == "step_0000002"
    assert json.loads((out / "lora" / "odecm_student.json").read_text())["grid_size"] == 10
    assert metrics["steps"] == metrics["optimizer_steps"] == 2 and metrics["segments"] == 1


def test_log_and_metrics_count_unreadable_samples(first):
    out, metrics, _ = first
    data = metrics["data"]
    logged = sum(r.get("data_skipped_unreadable_image", 0) for r in _log(out))
    assert data["skipped_by_reason"]["unreadable_image"] == logged >= 1
    assert data["delivered"] == 2 * 4 and data["skipped"] == logged


def test_tensorboard_holds_the_logged_losses(first):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = first
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars == pytest.approx({r["step"]: r["loss"] for r in _log(out)}, rel=1e-6)
    assert {"validation/k1", "validation/k4"} <= set(events.Tags()["images"])


def test_validation_images_every_k_steps(first):
    from PIL import Image

    out, _, _ = first
    assert [p.name for p in (out / "validation").iterdir()] == ["step_0000002"]
    files = sorted(p.name for p in (out / "validation" / "step_0000002").iterdir())
    assert files == ["k1_p0.png", "k1_p1.png", "k4_p0.png", "k4_p1.png"]
    one, four = (Image.open(out / "validation" / "step_0000002" / f"k{k}_p0.png") for k in (1, 4))
    assert one.size == four.size == (32, 32) and one.tobytes() != four.tobytes()


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(first, images):
    out, _, _ = first
    before = _tree(out)
    with pytest.raises(RunDirError, match="is not empty.*resume='latest'"):
        _main(_argv(out, images))
    assert _tree(out) == before


def test_resume_latest_on_a_finished_run_reports_it_and_keeps_its_outputs(first, images, monkeypatch):
    import sdxl.train

    out, metrics, _ = first
    before = _tree(out)
    monkeypatch.setattr(sdxl.train, "build_run", lambda *a, **k: pytest.fail("model loaded for a finished run"))
    again, printed = _main(_argv(out, images, "--resume", "latest"))
    assert "already finished" in printed and again == metrics
    assert _tree(out) == before


def _lora(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k).clone() for k in fh.keys()}, fh.metadata()  # no map of a file cut below


@pytest.mark.parametrize("damage", ["outputs_missing", "lora_half_written"])
def test_resume_of_a_finished_run_writes_its_missing_final_outputs(first, images, tmp_path, monkeypatch, damage):
    """Killed after the final checkpoint was published: before the LoRA was written (outputs_missing), or
    during the LoRA save of a version that wrote in place (a truncated file, no COMPLETE marker)."""
    import sdxl.train

    out, metrics, _ = first
    copy = tmp_path / "killed"
    shutil.copytree(out, copy)
    lora = copy / "lora" / "pytorch_lora_weights.safetensors"
    written, written_meta = _lora(lora)
    assert json.loads((copy / "lora" / "COMPLETE").read_text())["step"] == 2
    if damage == "outputs_missing":
        shutil.rmtree(copy / "lora")
        (copy / "metrics.json").unlink()
    else:
        lora.write_bytes(lora.read_bytes()[:100])
        (copy / "lora" / "COMPLETE").unlink()
    log, config = (copy / "log.jsonl").read_text(), (copy / "config.json").read_text()
    again, printed = _main(_argv(copy, images, "--resume", "latest"))
    assert "writing them from its checkpoint of step 2" in printed and "already finished" not in printed
    tensors, meta = _lora(lora)  # the same LoRA as the uninterrupted run wrote: every tensor, the adapter config
    assert meta == written_meta and tensors.keys() == written.keys()
    assert all(torch.equal(tensors[k], written[k]) for k in written)
    assert json.loads((copy / "lora" / "COMPLETE").read_text())["step"] == 2
    assert again["steps"] == 2 and again["final_loss"] == metrics["final_loss"] and again["segments"] == 1
    assert again["this_segment"]["steps"] == 0 and again["this_segment"]["outputs_rewritten"]
    assert again["data"]["skipped_by_reason"] == metrics["data"]["skipped_by_reason"]
    assert (copy / "log.jsonl").read_text() == log and (copy / "config.json").read_text() == config
    assert not [p.name for p in copy.iterdir() if p.name.endswith(".tmp")]
    # now complete: the next resume loads nothing and changes nothing
    before = _tree(copy)
    monkeypatch.setattr(sdxl.train, "build_run", lambda *a, **k: pytest.fail("model loaded for a finished run"))
    _, printed = _main(_argv(copy, images, "--resume", "latest"))
    assert "already finished" in printed and _tree(copy) == before


def test_resume_refuses_changes_of_what_defines_the_run(first, images):
    out, _, _ = first
    before = _tree(out)
    with pytest.raises(ConfigChangeError) as err:
        _main(_argv(out, images, "distill.optim.lr=0.002", "distill.solver=euler_vp", "distill.seed=1",
                    "distill.train_steps=3", "--resume", "latest"))
    message = str(err.value)
    for key in ("distill.optim.lr: 0.001 -> 0.002", "distill.solver: 'ddim' -> 'euler_vp'", "distill.seed"):
        assert key in message
    assert "distill.train_steps" not in message  # growing the step count is allowed
    assert _tree(out) == before
    with pytest.raises(ConfigError, match="may only grow"):
        _main(_argv(out, images, "distill.train_steps=1", "--resume", "latest"))


def test_resume_with_more_steps_and_an_allowed_change(first, images, tmp_path):
    out, metrics, _ = first
    copy = tmp_path / "continued"
    shutil.copytree(out, copy)
    more, printed = _main(_argv(copy, images, "distill.train_steps=3", "distill.optim.lr=0.002", "--resume", "latest",
                               "--allow-change", "distill.optim.lr"))
    assert [r["step"] for r in _log(copy)] == [1, 2, 3]
    assert more["steps"] == 3 and more["segments"] == 2 and more["optimizer_steps"] == 3
    assert more["this_segment"]["resumed_from_step"] == 2 and more["this_segment"]["steps"] == 1
    assert _log(copy)[-1]["lr"] == 0.002
    changes = json.loads((copy / "config.json").read_text())["_provenance"]["resume_changes"]
    assert any(c.startswith("distill.optim.lr: 0.001 -> 0.002") and "allow_change" in c for c in changes)
    assert any(c.startswith("distill.train_steps: 2 -> 3") for c in changes)
    assert more["data"]["delivered"] == 3 * 4  # the data counts cover the whole run too
    assert more["final_loss"] == _log(copy)[-1]["loss_global"]


def test_overwrite_gives_the_first_runs_losses_with_the_model_cached(first, images, tmp_path, cache):
    out, metrics, _ = first
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    model = cache / "tiny_sdxl_seed0" / "unet" / "diffusion_pytorch_model.safetensors"
    built = model.stat().st_mtime_ns
    again, _ = _main(_argv(copy, images, "--overwrite"))
    assert model.stat().st_mtime_ns == built  # found cached, not rebuilt
    assert [r["loss"] for r in _log(copy)] == [r["loss"] for r in _log(out)]
    assert again["segments"] == 1 and again["final_loss"] == metrics["final_loss"]
