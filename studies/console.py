"""Console scripts (``pyproject.toml [project.scripts]``): ``odecm-<name>`` runs ``python -m <module>``.

Each script imports its module only when called (``odecm-score-error`` never loads diffusers) and runs
the module's ``main`` through ``odecm.cli.run_main``: a bad key or value is one ``error:`` line and
exit status 2, success is exit status 0.
"""
from __future__ import annotations

import importlib

from odecm.cli import run_main

#: console script name -> the module whose ``main(argv)`` it runs
SCRIPTS = {
    "odecm-score-error": "studies.score_error",
    "odecm-paradox-map": "studies.paradox_map",
    "odecm-image-world": "studies.image_world",
    "odecm-report": "studies.report",
    "odecm-sdxl-train": "sdxl.train",
    "odecm-sdxl-precompute-targets": "sdxl.precompute_targets",
    "odecm-sdxl-latent-cache": "sdxl.latent_cache",
    "odecm-sdxl-reference": "sdxl.reference",
    "odecm-sdxl-sample": "sdxl.sample",
    "odecm-sdxl-evaluate": "sdxl.evaluate",
}


def _run(module: str) -> None:
    run_main(importlib.import_module(module).main)


def score_error() -> None:
    _run("studies.score_error")


def paradox_map() -> None:
    _run("studies.paradox_map")


def image_world() -> None:
    _run("studies.image_world")


def report() -> None:
    _run("studies.report")


def sdxl_train() -> None:
    _run("sdxl.train")


def sdxl_precompute_targets() -> None:
    _run("sdxl.precompute_targets")


def sdxl_latent_cache() -> None:
    _run("sdxl.latent_cache")


def sdxl_reference() -> None:
    _run("sdxl.reference")


def sdxl_sample() -> None:
    _run("sdxl.sample")


def sdxl_evaluate() -> None:
    _run("sdxl.evaluate")
