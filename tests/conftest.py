"""Shared pytest setup: no network, and one tiny SDXL-architecture pipeline folder per session.

Fixtures
--------
``tiny_sdxl_dir``: path of a folder written by ``sdxl.tiny.build_tiny_sdxl(folder, seed=0)``
(a StableDiffusionXLPipeline layout; load with ``from_pretrained(folder)`` or
``sdxl.teacher.load_sdxl(folder)``). Built once per test session; treat it as read-only.
"""
from __future__ import annotations

import os

# Hub access must fail fast: without these a stray from_pretrained("org/name") retries ~30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL pipeline saved with ``save_pretrained`` (seed 0); read-only for tests."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sdxl.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's torch work on one thread (opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``). On shared, oversubscribed CPUs
    OpenMP spin-waiting makes tiny-model tests 10-30x slower with 2+ threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
