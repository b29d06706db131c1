"""Bad inputs of the SDXL evaluation entry points are refused at the door: one ``error: ...`` line naming the
key, the value and what is allowed, exit status 2, no model loaded and nothing written.

Table-driven: each case is (id, entry point, setup, argv, message fragment). ``setup(root)`` builds the
folders the case needs (before the snapshot); ``argv`` may use ``{root}``. Extend ``CASES`` for new checks.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from odecm.cli import run_main  # noqa: E402
from sdxl import evaluate, reference, sample  # noqa: E402

from sdxl_eval_fakes import fake_reference, fake_run, fake_samples, files_under  # noqa: E402

ENTRY = {"reference": reference.main, "sample": sample.main, "evaluate": evaluate.main}


def _captions(root, text="a red cat\na blue dog\n", name="caps.txt"):
    (root / name).write_text(text)


def _model_folder(root):
    (root / "model" / "vae").mkdir(parents=True)
    (root / "model" / "model_index.json").write_text("{}")
    (root / "model" / "vae" / "config.json").write_text('{"block_out_channels": [32, 64, 64, 64]}')  # factor 8


def _ref(root, **kw):
    fake_reference(root / "ref", **kw)


def _ref_and_run(**run_kw):
    def setup(root):
        fake_reference(root / "ref")
        fake_run(root / "run", **run_kw)
    return setup


def _other_reference_out_dir(root):
    _captions(root)
    _model_folder(root)
    fake_reference(root / "out", solver="heun_vp")


def _other_samples_out_dir(root):
    fake_reference(root / "ref")
    fake_run(root / "run")
    fake_samples(root / "out", root / "ref", key={"weights": "lora@someone-else", "kind": "lora"})


def _samples(written=None, steps=(1,)):
    def setup(root):
        fake_reference(root / "ref")
        fake_samples(root / "samples", root / "ref", written=written, steps=steps)
    return setup


REF = ["captions={root}/caps.txt", "model.pretrained={root}/model", "cache_dir={root}/cache"]
SAMPLE = ["reference={root}/ref", "out_dir={root}/out"]

CASES = [
    # ---- sdxl.reference
    ("grid-not-dividing-1000", "reference", _captions, REF + ["grid_size=7"], "grid_size=7 must divide the 1000"),
    ("skip-grid-N1000-diffusers", "reference", _captions, REF + ["grid_size=1000", "model.timestep_offset=0"],
     "t_0 = t_1"),
    ("unknown-solver", "reference", _captions, REF + ["solver=rk4"], "solver: 'rk4' is not allowed"),
    ("missing-captions", "reference", None, REF, "captions={root}/caps.txt: no such file"),
    ("caption-suffix", "reference", lambda r: _captions(r, name="caps.csv"),
     ["captions={root}/caps.csv", "model.pretrained=tiny", "cache_dir={root}/cache"], "allowed suffixes .txt"),
    ("empty-captions", "reference", lambda r: _captions(r, text="\n\n"), REF, "no captions in the file"),
    ("too-many-captions", "reference", _captions, REF + ["num_captions=5"], "holds only 2"),
    ("missing-model-folder", "reference", _captions, ["captions={root}/caps.txt", "model.pretrained={root}/nope"],
     "model.pretrained={root}/nope: no such folder"),
    ("uncached-hub-model-offline", "reference", _captions, ["captions={root}/caps.txt", "model.pretrained=nobody/no-model"],
     "not in the local Hugging Face cache"),
    ("resolution-not-multiple-of-vae-factor", "reference", lambda r: (_captions(r), _model_folder(r)),
     REF + ["resolution=1020"], "resolution=1020: must be a multiple of the VAE's downsampling factor 8"),
    ("missing-vae", "reference", lambda r: (_captions(r), _model_folder(r)), REF + ["model.vae={root}/vae"], "model.vae={root}/vae: no such folder"),
    ("reference-out-dir-of-other-inputs", "reference", _other_reference_out_dir, REF + ["out_dir={root}/out"],
     "solver: 'heun_vp' (stored) vs 'ddim' (now)"),
    # ---- sdxl.sample
    ("steps-zero", "sample", _ref, SAMPLE + ["steps=[0]"], "k = 0 would return the initial noise"),
    ("steps-repeated", "sample", _ref, SAMPLE + ["steps=[1,1]"], "repeats a value"),
    ("missing-reference", "sample", None, SAMPLE, "reference={root}/ref: no such folder"),
    ("reference-without-manifest", "sample", lambda r: (r / "ref").mkdir(), SAMPLE, "no manifest.json"),
    ("incomplete-reference", "sample", lambda r: _ref(r, n=4, written=2), SAMPLE, "incomplete (2 of 4 captions missing)"),
    ("missing-weights", "sample", _ref, SAMPLE + ["weights={root}/run/lora"], "weights={root}/run/lora: no such file"),
    ("full-student-without-unet", "sample", _ref_and_run(), SAMPLE + ["weights={root}/run", "kind=full"],
     "a folder with unet/ for kind=full"),
    ("student-reference-indexing-mismatch", "sample", _ref_and_run(offset=0), SAMPLE + ["weights={root}/run/lora"],
     "student=0 ({root}/run/config.json), reference=1"),
    ("request-indexing-mismatch", "sample", _ref_and_run(), SAMPLE + ["weights={root}/run/lora", "model.timestep_offset=0"],
     "request=0"),
    ("student-indexing-unknown", "sample", _ref_and_run(config=False), SAMPLE + ["weights={root}/run/lora"],
     "model.timestep_offset: unknown for weights"),
    ("reference-of-another-solver", "sample", _ref_and_run(solver="heun_vp"), SAMPLE + ["weights={root}/run/lora"],
     "solver: 'heun_vp' (student's run) vs 'ddim' (reference)"),
    ("label-contradicts-run", "sample", _ref_and_run(), SAMPLE + ["weights={root}/run/lora", "method=direct_cd"],
     "says distill.method='cd'"),
    ("other-base-model", "sample", lambda r: (_ref(r), _model_folder(r)), SAMPLE + ["model.pretrained={root}/model"],
     "differs from the reference's"),
    ("samples-out-dir-of-other-weights", "sample", _other_samples_out_dir, SAMPLE + ["weights={root}/run/lora"],
     "holds a student_samples of other inputs"),
    ("sample-device-not-a-device", "sample", _ref, SAMPLE + ["device=gpu0"], "device=gpu0: not a torch device"),
    # ---- sdxl.evaluate
    ("missing-samples", "evaluate", None, ["samples={root}/samples"], "samples={root}/samples: no such folder"),
    ("incomplete-samples", "evaluate", _samples(written=1), ["samples={root}/samples"], "incomplete (1 of 2 captions"),
    ("missing-real-images", "evaluate", _samples(), ["samples={root}/samples", "real_images={root}/real"],
     "real_images={root}/real: no such folder"),
    ("missing-aesthetic-file", "evaluate", _samples(), ["samples={root}/samples", "weights.aesthetic={root}/aes.pth"],
     "weights.aesthetic={root}/aes.pth: no such file"),
    ("missing-fid-inception-file", "evaluate", _samples(), ["samples={root}/samples", "weights.fid_inception={root}/i.pt"],
     "weights.fid_inception={root}/i.pt: no such file"),
    ("unknown-fd-protocol", "evaluate", _samples(), ["samples={root}/samples", "fd_protocol=tf2"],
     "fd_protocol: 'tf2' is not allowed"),
    ("evaluate-device-not-a-device", "evaluate", _samples(), ["samples={root}/samples", "device=gpu0"],
     "device=gpu0: not a torch device"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_at_the_door(case, tmp_path, capsys, monkeypatch):
    _, entry, setup, argv, fragment = case
    monkeypatch.setenv("ODECM_CACHE_DIR", str(tmp_path / "odecm_cache"))  # file digests land outside root
    root = tmp_path / "root"
    root.mkdir()
    if setup is not None:
        setup(root)
    before = files_under(root)
    # any model load would be a failure of the check at the door
    monkeypatch.setattr("sdxl.teacher.load_sdxl", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exc:
        run_main(ENTRY[entry], ["--set", *[a.format(root=root) for a in argv]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment.format(root=root) in err[0], err[0]
    assert files_under(root) == before  # nothing written, nothing touched


def test_cases_cover_every_entry_point():
    assert {c[1] for c in CASES} == set(ENTRY) and len({c[0] for c in CASES}) == len(CASES)
    assert json.dumps([c[0] for c in CASES])  # ids are plain strings
