"""docs/sdxl_training.md's commands are valid as written: every ``sdxl.train`` / ``sdxl.precompute_targets``
command line (also behind ``accelerate launch`` or ``torchrun``) parses, and its config validates."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "sdxl_training.md"


def _commands() -> list[tuple[str, list[str]]]:
    text = DOC.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"-m (sdxl\.train|sdxl\.precompute_targets) (.*)$", line)
            if m:
                out.append((m.group(1), shlex.split(m.group(2))))
    return out


COMMANDS = _commands()


def test_the_doc_has_commands():
    modules = {m for m, _ in COMMANDS}
    assert modules == {"sdxl.train", "sdxl.precompute_targets"} and len(COMMANDS) >= 10


@pytest.mark.parametrize("module, argv", COMMANDS, ids=[" ".join(a)[:60] for _, a in COMMANDS])
def test_command_parses_and_its_config_validates(module, argv):
    from odecm.cli import overrides_from
    from sdxl.train import parse_args
    from sdxl.train_config import load_train_config

    args = parse_args(argv)  # precompute_targets takes a subset of these flags
    if module == "sdxl.precompute_targets":
        assert not (args.resume or args.overwrite or args.allow_change)
    load_train_config(args.config, overrides_from(args))
