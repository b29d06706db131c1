"""Shared pytest setup: no network, odecm's cache in a session folder, one tiny SDXL pipeline per session.

Fixtures
--------
``odecm_cache_dir`` (autouse, session): ``$ODECM_CACHE_DIR`` (``odecm.runs.cache_root()``) points at a
temporary folder for the whole session, so tests never write to ``~/.cache``; what one test caches
(learned toy teachers, image-world models, file digests, the tiny model) later tests of the session
find. The previous value is restored at the end.

``tiny_sdxl_dir``: ``<odecm_cache_dir>/tiny_sdxl_seed0``, written by ``sdxl.tiny.cached_tiny_sdxl(seed=0)``
(``build_tiny_sdxl``: a StableDiffusionXLPipeline layout; load with ``from_pretrained(folder)`` or
``sdxl.teacher.load_sdxl(folder)``), so ``model.pretrained=tiny`` finds the same folder. Built once per
test session; treat it as read-only.
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


@pytest.fixture(scope="session", autouse=True)
def odecm_cache_dir(tmp_path_factory):
    """odecm's cache folder for this session (``$ODECM_CACHE_DIR``), restored afterwards."""
    folder = tmp_path_factory.mktemp("odecm_cache")
    with pytest.MonkeyPatch.context() as mp:  # restored afterwards
        mp.setenv("ODECM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(odecm_cache_dir):
    """A tiny random SDXL pipeline saved with ``save_pretrained`` (seed 0), where ``model.pretrained=tiny``
    looks for it; read-only for tests."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sdxl.tiny import cached_tiny_sdxl

    return cached_tiny_sdxl(seed=0, root=odecm_cache_dir)


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
