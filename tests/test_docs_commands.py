"""Every command line in README.md and docs/*.md runs as written (issue 12).

Every line of every ```bash block is extracted (``\\`` continuations joined, ``for V in a b; do ... done``
loops unrolled, ``# ...`` comments stripped, ``&&`` / ``;`` chains split, ``VAR=value`` prefixes applied
to the environment) and checked by what it runs:

* ``python -m M``, ``accelerate launch [...] -m M``, ``torchrun [...] -m M`` and the console scripts
  ``odecm-*`` of an entry point (``ENTRY_POINTS``): ``M.main(argv + ["--check"])`` in this process (no
  subprocess: imports cost 5-10 s each) must print ``ok: M ...``; the launcher's process count
  (``--num_processes``, ``--nproc_per_node``) becomes ``WORLD_SIZE``. Each file's lines run in document
  order in one scratch folder (the current directory), so a line finds what earlier lines made.
* ``python -m`` of any other module: it exists (``benchmarks.*`` with a ``parse_args`` parse the line's
  flags); ``python -m pytest FILES``: the files exist; ``bash FILE``: the file exists; ``pip install``:
  the extras exist in pyproject.toml; ``mkdir`` / ``printf`` / ``echo`` run in bash (the scratch folder).
  A command the test does not know fails it (teach it here).

**GPU marker**: a command whose trailing comment names ``GPU`` or ``CUDA`` (by convention ``... # GPU``)
needs a GPU or user weights to run for real. It is validated with ``--check`` all the same, as if this
machine had one CUDA device.

Placeholders (``PLACEHOLDERS``: ``/data/...`` paths, ``FILE``) are replaced by fixtures in the scratch
folder; inputs a line names that no earlier line makes (an image folder, captions, a student's LoRA, a
reference, weight files, a hub model such as ``stabilityai/stable-diffusion-xl-base-1.0``) are made as
tiny fixtures before the line (``_provide_inputs``; hub models as a local Hugging Face cache holding their
small JSON configs), and after a line passes, what it would write for the next line (a teacher
reference, student samples, an eval folder) is stood in by a fixture (``_stand_in_outputs``).

Run for real, cheaply: ``python -m sdxl.train --config tiny_cpu ... distill.train_steps=2`` of
docs/sdxl_training.md (its next lines resume that run) and the README's main job with
``--quick --out <tmp>``. The CPU smoke block of docs/sdxl_protocol.md runs for real in
tests/test_paper_protocol.py.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: modules whose ``main(argv)`` takes ``--check``
ENTRY_POINTS = {"studies.score_error", "studies.paradox_map", "studies.image_world", "studies.latent_space",
                "studies.inductive_bias", "studies.solver_ablation", "studies.report", "studies.sdxl_table",
                "sdxl.train", "sdxl.precompute_targets", "sdxl.latent_cache", "sdxl.reference", "sdxl.sample",
                "sdxl.evaluate"}
#: placeholders of the docs -> a path under the scratch folder (made by ``_provide_inputs``) or a real file
PLACEHOLDERS = {"/data/laion_aesthetics_6.5plus_11k": "placeholder/images",
                "/data/targets_ddim": "placeholder/targets_ddim",
                "FILE": str(REPO / "studies" / "configs" / "paradox_map_k.yaml")}
#: lines run for real (file, the line as written -> extra arguments)
REAL_RUNS = {("README.md", "python -m studies.score_error"): ["--quick", "--out", "readme_quick", "--no-progress"],
             ("docs/sdxl_training.md",
              "python -m sdxl.train --config tiny_cpu --set out_dir=runs/tiny_a distill.train_steps=2"): []}
#: lines known not to run as written, in files this test's author may not edit (the fix is pending):
#: they must still fail with this message (so the list stays true); fix the doc, then drop the entry
PENDING_FIXES: dict[tuple[str, str], str] = {}
SHELL_OK = {"mkdir", "printf", "echo"}
SDXL_HUB = {"stabilityai/stable-diffusion-xl-base-1.0": "pipeline", "madebyollin/sdxl-vae-fp16-fix": "vae"}


# ----------------------------------------------------------------------------------------------- extraction
@dataclasses.dataclass
class Command:
    doc: str          # README.md or docs/<name>.md
    line: int         # first line in the file
    text: str         # the whole (joined, unrolled) line, comment stripped
    kind: str         # entry | module | pytest | bash | pip | shell | setup | unknown
    module: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    gpu: bool = False

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment): a ``#`` at the start or after whitespace, outside quotes, starts the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _logical_lines(block: str, first: int) -> list[tuple[int, str]]:
    """Physical lines joined at ``\\`` continuations, with the number of each one's first line."""
    out, pending, start = [], "", first
    for i, raw in enumerate(block.splitlines()):
        if not pending:
            start = first + i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    return out


def _unroll_loops(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """``for V in a b c; do`` ... ``done`` -> the body once per value with ``$V`` / ``${V}`` replaced."""
    out, i = [], 0
    while i < len(lines):
        m = re.fullmatch(r"\s*for (\w+) in ([^;]+);\s*do\s*", _split_comment(lines[i][1])[0])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if _split_comment(lines[j][1])[0].strip() == "done")
        var = re.compile(rf"\$\{{{m.group(1)}\}}|\${m.group(1)}(?!\w)")
        for value in m.group(2).split():
            out += [(n, var.sub(value, text)) for n, text in lines[i + 1:end]]
        i = end + 1
    return out


def _console_scripts() -> dict[str, str]:
    from studies.console import SCRIPTS

    return SCRIPTS


def _classify(doc: str, line: int, tokens: list[str], text: str, gpu: bool) -> Command:
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    cmd = Command(doc, line, text, "unknown", env=env, gpu=gpu)
    if not tokens:
        return cmd
    head = tokens[0]
    if head in ("accelerate", "torchrun", "python", "python3") and "-m" in tokens:
        at = tokens.index("-m")
        launcher, cmd.module, cmd.argv = tokens[1:at], tokens[at + 1], tokens[at + 2:]
        for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
            if flag in launcher:
                cmd.env["WORLD_SIZE"] = launcher[launcher.index(flag) + 1]
        cmd.kind = ("entry" if cmd.module in ENTRY_POINTS else "pytest" if cmd.module == "pytest"
                    else "setup" if cmd.module == "venv" else "module")
    elif head in _console_scripts():
        cmd.kind, cmd.module, cmd.argv = "entry", _console_scripts()[head], tokens[1:]
    elif head in ("bash", "sh"):
        cmd.kind, cmd.argv = "bash", tokens[1:]
    elif head == "pip" and tokens[1:2] == ["install"]:
        cmd.kind, cmd.argv = "pip", tokens[2:]
    elif head in SHELL_OK:
        cmd.kind = "shell"
    elif head in (".", "source"):
        cmd.kind = "setup"
    return cmd


def doc_commands(doc: Path, text: str | None = None) -> list[Command]:
    """Every command of ``doc``'s bash blocks (``text`` instead of the file's, for tests of the extractor)."""
    text = doc.read_text() if text is None else text
    name = str(doc.relative_to(REPO)) if doc.is_absolute() else str(doc)
    out = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        first = text.count("\n", 0, m.start(1)) + 1
        for line, raw in _unroll_loops(_logical_lines(m.group(1), first)):
            code, comment = _split_comment(raw)
            if not code.strip():
                continue
            gpu = bool(re.search(r"\b(GPU|CUDA)\b", comment))
            lex = shlex.shlex(code, posix=True, punctuation_chars=";&|")
            lex.whitespace_split = True
            parts: list[list[str]] = [[]]
            for tok in lex:
                if tok in ("&&", ";", "||"):
                    parts.append([])
                else:
                    parts[-1].append(tok)
            cmds = [_classify(name, line, p, " ".join(p), gpu) for p in parts if p]
            if any(c.kind == "shell" for c in cmds) and all(c.kind == "shell" for c in cmds):
                cmds = [Command(name, line, code.strip(), "shell")]  # run as one bash line (redirections)
            out += cmds
    return out


ALL = [c for doc in DOCS for c in doc_commands(doc)]


# ----------------------------------------------------------------------------------------------- fixtures
def _fake_hub_cache(root: Path) -> Path:
    """A local Hugging Face cache holding the SDXL repos' small JSON configs (no weights)."""
    from sdxl.tiny import SDXL_SCHEDULER_CONFIG

    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.13025}
    files = {"pipeline": {"model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
                          "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler",
                                                              **SDXL_SCHEDULER_CONFIG},
                          "vae/config.json": vae},
             "vae": {"config.json": vae}}
    for repo, kind in SDXL_HUB.items():
        base = root / ("models--" + repo.replace("/", "--"))
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text("0" * 40)
        for name, data in files[kind].items():
            path = base / "snapshots" / ("0" * 40) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
    return root


def _sets(argv: list[str]) -> dict[str, str]:
    """``key=value`` arguments of a command line (after ``--set``)."""
    return dict(a.split("=", 1) for a in argv if re.fullmatch(r"[\w.]+=.*", a))


def _train_config(argv: list[str]):
    from odecm.cli import overrides_from
    from sdxl.train import parse_args
    from sdxl.train_config import load_train_config

    args = parse_args([a for a in argv if a != "--check"])
    return load_train_config(args.config, overrides_from(args))


def _eval_config(module: str, argv: list[str]):
    from sdxl.eval_config import (
        EvaluateConfig,
        ReferenceConfig,
        SampleConfig,
        cli_config,
    )

    model = {"sdxl.reference": ReferenceConfig, "sdxl.sample": SampleConfig, "sdxl.evaluate": EvaluateConfig}[module]
    return cli_config(model, argv)


def _shipped_students() -> dict:
    """``{student folder: run config}`` of the shipped SDXL configs (sdxl/configs/*.yaml)."""
    from sdxl.train import student_folder
    from sdxl.train_config import load_train_config

    configs = [load_train_config(p.stem, []) for p in sorted((REPO / "sdxl" / "configs").glob("*.yaml"))]
    return {student_folder(c): c for c in configs}


def _provide_inputs(cmd: Command) -> None:
    """Make the inputs ``cmd`` names that are not there (tiny fixtures in the scratch folder)."""
    from sdxl_eval_fakes import fake_reference, fake_run, fake_samples

    sets = _sets(cmd.argv)
    if cmd.module == "sdxl.train" and "--resume" in cmd.argv:
        from odecm.checkpoint import CHECKPOINTS, LATEST, write_checkpoint
        from odecm.config import config_to_dict

        cfg = _train_config(cmd.argv)
        ckdir = Path(cfg.out_dir) / CHECKPOINTS
        if not (ckdir / LATEST).exists():  # an interrupted run of this config: a checkpoint's meta, no tensors
            (ckdir / "step_50").mkdir(parents=True)
            write_checkpoint(ckdir / "step_50", {"step": 50, "run_id": "fixture", "config": config_to_dict(cfg)}, {}, {})
            (ckdir / LATEST).write_text("step_50")
    if cmd.module in ("sdxl.train", "sdxl.precompute_targets") and "data.path" in sets:
        path = Path(sets["data.path"])
        if not path.exists() and sets.get("data.source", "images") == "images":
            from sdxl.data import make_synthetic_dataset

            make_synthetic_dataset(path, 16, size=[(64, 64)], seed=0)
        elif not path.exists() and sets.get("data.source") == "targets":
            from sdxl_train_fakes import write_fake_targets

            cfg = _train_config(cmd.argv)
            write_fake_targets(path, cfg.model.pretrained, n=16)
            index = json.loads((path / "index.json").read_text())
            index.update(solver=cfg.distill.solver, grid_size=cfg.distill.grid_size, grid=cfg.distill.grid,
                         timestep_offset=cfg.model.timestep_offset, guidance_scale=cfg.teacher.guidance_scale,
                         cfg_convention=cfg.teacher.cfg_convention, uncond=cfg.teacher.uncond)
            (path / "index.json").write_text(json.dumps(index))
    if cmd.module == "sdxl.reference" and "captions" in sets and not Path(sets["captions"]).exists():
        Path(sets["captions"]).parent.mkdir(parents=True, exist_ok=True)
        Path(sets["captions"]).write_text("a red cat\na blue dog on a hill\n")
    if cmd.module == "sdxl.sample" and "reference" in sets:
        ref = Path(sets["reference"])
        if not ref.exists():
            fake_reference(ref, solver=ref.name)
        weights = Path(sets.get("weights", "."))
        if not weights.exists():  # a shipped config's student: its run config (sdxl.sample checks the pairing)
            run = _shipped_students().get(weights)
            key = json.loads((ref / "manifest.json").read_text())["key"]
            if run is not None:
                fake_run(weights.parent, offset=run.model.timestep_offset, solver=run.distill.solver,
                         method=run.distill.method, grid_size=run.distill.grid_size,
                         guidance_scale=run.teacher.guidance_scale)
            else:  # a student of no shipped config: one that fits the reference
                fake_run(weights.parent, offset=key["timestep_offset"], solver=key["solver"],
                         grid_size=key["grid_size"], guidance_scale=key["guidance_scale"])
    if cmd.module == "sdxl.evaluate":
        if "samples" in sets and not Path(sets["samples"]).exists():
            fake_samples(Path(sets["samples"]), fake_reference(Path("placeholder/reference")))
        for key in ("weights.aesthetic", "weights.fid_inception"):
            if sets.get(key) not in (None, "null", "default") and not Path(sets[key]).exists():
                Path(sets[key]).parent.mkdir(parents=True, exist_ok=True)
                Path(sets[key]).write_bytes(b"stands in for a weight file")
    if cmd.module == "studies.image_world":
        import numpy as np

        for key in ("data.path", "data.labels_path"):
            if key in sets and not Path(sets[key]).exists():
                np.save(sets[key], np.zeros((8, 8, 8)) if key == "data.path" else np.zeros(8, dtype=np.int64))


def _stand_in_outputs(cmd: Command) -> None:
    """After ``cmd`` passed its check: a fixture for what it would write that later lines read."""
    from sdxl_eval_fakes import fake_reference, fake_samples

    if cmd.module == "sdxl.reference":
        cfg = _eval_config(cmd.module, cmd.argv)
        if cfg.out_dir and not Path(cfg.out_dir).exists():
            fake_reference(Path(cfg.out_dir), offset=cfg.model.timestep_offset, solver=cfg.solver,
                           grid_size=cfg.grid_size, guidance_scale=cfg.guidance_scale)
    elif cmd.module == "sdxl.sample":
        cfg = _eval_config(cmd.module, cmd.argv)
        if not Path(cfg.out_dir).exists():
            fake_samples(Path(cfg.out_dir), Path(cfg.reference), steps=cfg.steps)
    elif cmd.module == "sdxl.evaluate":
        cfg = _eval_config(cmd.module, cmd.argv)
        Path(cfg.out_dir or Path(cfg.samples) / "eval").mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------- checks
def _fill(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        for placeholder, value in PLACEHOLDERS.items():
            a = value if a == placeholder else a.replace(placeholder + "/", value + "/").replace(
                "=" + placeholder, "=" + value)
        out.append(a)
    return out


def _glob(argv: list[str]) -> list[str]:
    """Shell globbing (a pattern without a match stays as written, as in bash)."""
    out = []
    for a in argv:
        hits = sorted(str(p) for p in Path(".").glob(a)) if any(ch in a for ch in "*?[") and "=" not in a else []
        out += hits or [a]
    return out


def run_check(cmd: Command, monkeypatch) -> str:
    """``cmd``'s module ``main(argv + ['--check'])`` in this process; returns its stdout ("" = failed)."""
    from odecm.config import ConfigError

    with monkeypatch.context() as m:
        for key, value in cmd.env.items():
            m.setenv(key, value)
        if cmd.gpu:  # validated as on a machine with one CUDA device
            import torch

            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "device_count", lambda: 1)
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                importlib.import_module(cmd.module).main(cmd.argv + ["--check"])
        except (ConfigError, SystemExit) as err:
            return f"FAILED: {type(err).__name__}: {err}"
    return out.getvalue()


def check_command(cmd: Command, monkeypatch) -> str | None:
    """None if ``cmd`` runs as written (module docstring), else what is wrong."""
    notation = [a for a in cmd.argv if a.startswith("[-") or re.search(r"<[^<>]+>", a)]
    if notation:
        return f"usage notation or an unfilled placeholder, not a command line: {notation} (add it to PLACEHOLDERS?)"
    if cmd.kind == "entry":
        cmd = dataclasses.replace(cmd, argv=_glob(_fill(cmd.argv)))
        _provide_inputs(cmd)
        out = run_check(cmd, monkeypatch)
        if f"ok: {cmd.module} " not in out:
            return out.strip().splitlines()[-1] if out.strip() else "no 'ok:' line"
        _stand_in_outputs(cmd)
        return None
    if cmd.kind == "module":
        if importlib.util.find_spec(cmd.module) is None:
            return f"no module {cmd.module}"
        parse = getattr(importlib.import_module(cmd.module), "parse_args", None) if cmd.module.startswith(
            "benchmarks.") else None
        if parse is not None:
            try:
                parse(cmd.argv)
            except SystemExit:
                return f"{cmd.module}: its flags do not parse: {cmd.argv}"
        return None
    if cmd.kind == "pytest":
        missing = [a for a in cmd.argv if not a.startswith("-") and not (REPO / a.split("::")[0]).exists()]
        return f"no such test file: {missing}" if missing else None
    if cmd.kind == "bash":
        return None if (REPO / cmd.argv[0]).is_file() else f"no such script: {cmd.argv[0]}"
    if cmd.kind == "pip":
        extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        asked = {e for a in cmd.argv for m in re.finditer(r"\.\[([^\]]*)\]", a) for e in m.group(1).split(",")}
        return f"unknown extras {sorted(asked - extras)}" if asked - extras else None
    if cmd.kind == "shell":
        done = subprocess.run(["bash", "-c", cmd.text], capture_output=True, text=True, check=False)
        return done.stderr.strip() or None if done.returncode else None
    if cmd.kind == "setup":
        return None
    return "a command this test does not know (teach tests/test_docs_commands.py)"


#: what the docs' relative paths read from the repository (linked into the scratch folder)
REPO_ENTRIES = ("studies", "sdxl", "toys", "odecm", "benchmarks", "tests", ".ci", "pyproject.toml")


@pytest.fixture
def scratch(tmp_path, monkeypatch, tiny_sdxl_dir):
    """The current directory: a scratch folder that links the repository's code and configs (what a doc's
    relative paths read) and receives everything the commands write; the SDXL hub repos in a local cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(_fake_hub_cache(tmp_path / "hf_cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    for name in REPO_ENTRIES:
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    monkeypatch.chdir(work)
    return work


def _real_run(cmd: Command, monkeypatch) -> None:
    extra = REAL_RUNS[(cmd.doc, cmd.text)]
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", [cmd.module, *cmd.argv, *extra])
        importlib.import_module(cmd.module).main(cmd.argv + extra)


DOC_NAMES = sorted({c.doc for c in ALL})


@pytest.mark.parametrize("doc", DOC_NAMES)
def test_every_command_runs_as_written(doc, scratch, monkeypatch, capsys):
    failures = []
    for cmd in [c for c in ALL if c.doc == doc]:
        problem = check_command(cmd, monkeypatch)
        pending = PENDING_FIXES.get((cmd.doc, cmd.text))
        if pending is not None:
            if not (problem and pending in problem):
                failures.append(f"{cmd}\n    -> listed in PENDING_FIXES ({pending!r}) but got: {problem}")
        elif problem:
            failures.append(f"{cmd}\n    -> {problem}")
        elif (cmd.doc, cmd.text) in REAL_RUNS:
            _real_run(cmd, monkeypatch)
    assert not failures, "doc commands that do not run as written:\n" + "\n".join(failures)
    if doc == "README.md":  # the main job's smoke run wrote its results
        metrics = json.loads((scratch / "readme_quick" / "metrics.json").read_text())
        assert metrics["quick"] is True and (scratch / "readme_quick" / "table.md").is_file()


def test_the_docs_have_the_commands_this_test_knows():
    """The extractor found what the docs hold: every entry point a doc runs, no unknown command."""
    unknown = [str(c) for c in ALL if c.kind == "unknown"]
    assert not unknown, unknown
    modules = {c.module for c in ALL if c.kind == "entry"}
    assert {"studies.score_error", "sdxl.train", "sdxl.reference", "sdxl.sample", "sdxl.evaluate",
            "studies.sdxl_table", "sdxl.precompute_targets"} <= modules
    assert set(REAL_RUNS) <= {(c.doc, c.text) for c in ALL}, "a real-run line left the docs"
    assert any(c.gpu for c in ALL)


def test_extractor_joins_unrolls_and_splits():
    text = ("```bash\n"
            "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[sdxl]' && python -m studies.score_error\n"
            "for s in a b; do\n"
            "  accelerate launch --num_processes 8 -m sdxl.reference --set out_dir=refs/$s \\\n"
            "      solver=${s}_x   # GPU\n"
            "done\n"
            "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m sdxl.train --config tiny_cpu  # two 'ranks'\n"
            "odecm-score-error --quick\n"
            "```\n")
    cmds = doc_commands(Path("x.md"), text)
    assert [c.kind for c in cmds] == ["setup", "setup", "pip", "entry", "entry", "entry", "entry", "entry"]
    assert cmds[3].module == "studies.score_error" and cmds[3].argv == []
    assert [c.argv for c in cmds[4:6]] == [["--set", "out_dir=refs/a", "solver=a_x"], ["--set", "out_dir=refs/b", "solver=b_x"]]
    assert cmds[4].env == {"WORLD_SIZE": "8"} and cmds[4].gpu and cmds[4].line == 4
    assert cmds[6].env == {"ACCELERATE_USE_CPU": "1", "WORLD_SIZE": "2"} and not cmds[6].gpu
    assert cmds[7].module == "studies.score_error" and cmds[7].argv == ["--quick"]


@pytest.mark.parametrize("line, expected", [
    ("python -m studies.paradox_map --set no_such_key=1", "no_such_key"),              # an unknown key
    ("python -m sdxl.train --config cd_ddim --set distill.num_steps=100", "num_steps"),  # a stale key name
    ("python -m studies.score_error --config studies/configs/no_such.yaml", "no_such"),  # a missing file
    ("python -m studies.image_world --config studies/configs/image_world_gpu.yaml", "cuda"),  # GPU, unmarked
    ("python -m studies.no_such_study", "no module"),
    ("make all", "a command this test does not know"),
    ("python -m benchmarks.kill_resume --kills 10 [--json out.json]", "usage notation"),
    ("python -m sdxl.sample --set reference=refs/heun_vp weights=runs/sdxl_cd_ddim/lora out_dir=s", "other teacher"),
    ("python -m pytest tests/test_no_such_file.py", "no such test file"),
])
def test_a_broken_doc_command_is_caught(line, expected, scratch, monkeypatch):
    (cmd,) = doc_commands(Path("x.md"), f"```bash\n{line}\n```\n")
    problem = check_command(cmd, monkeypatch)
    assert problem and expected in problem, problem
