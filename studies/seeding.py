"""Seeds vary every source not under study (DESIGN.md, "Evidence rules").

A study's seed ``s`` (one entry of ``seeds``) is split into one independent seed per **source** of
randomness:

=============  ==========================================================================
``init``       the student's initial weights
``batch``      the order and content of its training batches (rows of the pool, or fresh draws)
``pool``       the Direct CD target pool (training pairs x0, n, noise and their endpoints)
``eval_noise`` the evaluation noise x_T (one-step samples, E and the ODE endpoints)
``reference``  the reference samples the distances are measured to (p_0, the teacher's samples)
``teacher``    a learned teacher's training seed (analytic teachers have none)
=============  ==========================================================================

``seed_for(source, s) = derive_seed(s, source)`` with ``derive_seed`` a ``numpy.random.SeedSequence``
of ``(s, index of source)``: distinct sources of one seed are independent streams, and changing ``s``
changes every one of them. A source named in ``hold_fixed`` uses ``fixed_seed`` instead of ``s`` for
every seed (e.g. ``hold_fixed: [pool, eval_noise, reference, teacher]`` varies only the student's
initialisation and batch order, the pre-2024 protocol). The resolved config, hence ``config.json``,
records which sources were held.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from odecm.config import StrictModel

__all__ = ["SOURCES", "Source", "derive_seed", "SeedConfig"]

SOURCES = ("init", "batch", "pool", "eval_noise", "reference", "teacher")
Source = Literal["init", "batch", "pool", "eval_noise", "reference", "teacher"]


def derive_seed(seed: int, source: str) -> int:
    """An independent 31-bit seed for ``source`` from the run seed ``seed`` (``SeedSequence((seed, i))``)."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; allowed: {list(SOURCES)}")
    state = np.random.SeedSequence([int(seed) % 2**63, SOURCES.index(source)]).generate_state(1, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF


class SeedConfig(StrictModel):
    """Which sources of randomness the seeds vary (all by default) and which are held fixed."""

    hold_fixed: list[Source] = Field(default_factory=list, description=f"sources held fixed across seeds: {SOURCES}")
    fixed_seed: int = Field(0, description="the seed a held source uses for every run seed")

    @field_validator("hold_fixed")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"sources listed twice: {v}")
        return v

    def seed_for(self, source: str, seed: int) -> int:
        """The seed of ``source`` in the run of seed ``seed`` (``fixed_seed`` when the source is held)."""
        return derive_seed(self.fixed_seed if source in self.hold_fixed else seed, source)

    def streams(self, seed: int) -> dict[str, int]:
        """Every source's seed for run seed ``seed``."""
        return {source: self.seed_for(source, seed) for source in SOURCES}

    def varied(self) -> list[str]:
        return [s for s in SOURCES if s not in self.hold_fixed]
