"""How an ensemble is distilled: ``TrainConfig`` (validated, shared by every member) and the ``TrainHistory`` it logs.

The loop that reads them is ``toys.ensemble_train``; both are re-exported by ``toys.ensemble``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from odecm.config import StrictModel

__all__ = ["TrainConfig", "TrainHistory"]

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class TrainConfig(StrictModel):
    """How one ensemble is distilled (shared by all members)."""

    renamed_keys = {"steps": "train_steps"}

    method: Literal["cd", "direct_cd", "cd_k"] = "cd"
    k: int | Literal["all"] | None = Field(None, description="cd_k: teacher steps before the target network "
                                                             "(1 = CD, 'all' = N = Direct CD)")
    direct_first_steps: int = Field(0, ge=0, description="two-phase schedule: Direct CD for these first steps, "
                                                         "then `method`")
    train_steps: int = Field(4000, ge=1, description="optimizer steps")
    batch_size: int = Field(256, ge=1, description="per member")
    lr: float = Field(2e-3, gt=0, description="finite, > 0, representable in float32")
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = Field(1.0, gt=0, description="per-member gradient norm clip; null = off")
    ema_rate: float = Field(0.0, ge=0, lt=1, description="target EMA rate mu; 0 = online student under stop-grad")
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    huber_c: float = Field(1e-3, gt=0)
    weighting: Literal["uniform", "snr", "karras"] = "uniform"
    index_scheme: Literal["per_sample", "shared"] = Field(
        "per_sample", description="n drawing for data='fresh' (pool rows always carry per-sample n)")
    data: Literal["pool", "fresh"] = Field("pool", description="pool: rows of a TargetPool; fresh: new samples")
    pool_size: int = Field(131072, ge=1, description="rows of each Direct CD target pool (TargetPool.build); "
                                                     "its seed is the caller's (studies: studies.seeding 'pool')")
    log_every: int = Field(50, ge=1)

    #: the old default of the removed ``pool_seed`` (recorded, never read, in the studies' config.json files)
    _LEGACY_POOL_SEED: ClassVar[int] = 12345

    @model_validator(mode="before")
    @classmethod
    def _removed_pool_seed(cls, data: Any) -> Any:
        """``pool_seed`` is gone (pools take their seed from the caller: ``TargetPool.build(..., seed)``; the
        studies derive it from ``studies.seeding``). A replayed config.json still holds its unused default;
        that is dropped, any other value is refused."""
        if isinstance(data, dict) and "pool_seed" in data:
            if data["pool_seed"] != cls._LEGACY_POOL_SEED:
                raise PydanticCustomError(
                    "removed_key", "pool_seed was removed: pool seeds come from the run seed (studies.seeding 'pool' "
                    "source); hold them fixed with seeding.hold_fixed=[pool] and seeding.fixed_seed")
            data = {k: v for k, v in data.items() if k != "pool_seed"}
        return data

    @field_validator("lr")
    @classmethod
    def _finite_lr(cls, v: float) -> float:
        if not (math.isfinite(v) and v < _FLOAT32_MAX):
            raise ValueError("must be finite in float32; allowed: 0 < lr < 3.4e38")
        return v

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v):
        if isinstance(v, int) and (isinstance(v, bool) or v < 1):
            raise ValueError("allowed: an integer >= 1 or 'all'")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.method == "cd_k" and self.k is None:
            raise ValueError("method='cd_k' needs k (an integer >= 1, or 'all')")
        if self.method != "cd_k" and self.k is not None:
            raise ValueError(f"k is used by method='cd_k' only (method={self.method!r})")
        if self.direct_first_steps and self.method == "direct_cd":
            raise ValueError("direct_first_steps applies to method 'cd' or 'cd_k' (Direct CD needs no first phase)")
        if self.direct_first_steps >= self.train_steps:
            raise ValueError(f"direct_first_steps={self.direct_first_steps} must be < train_steps={self.train_steps}")
        return self

    def k_steps(self, grid_size: int) -> int | None:
        """k as an integer for a grid of N = ``grid_size`` intervals ('all' -> N); None unless cd_k."""
        if self.method != "cd_k":
            return None
        return grid_size if self.k == "all" else int(self.k)


@dataclass
class TrainHistory:
    """Logged every ``log_every`` steps: ``step``, per-member ``loss`` (E,) and ``grad_norm`` (E,),
    plus wall time, the teacher's sample evaluations spent during training and ``phase`` per log row."""

    step: list[int] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)
    grad_norm: list[list[float]] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    seconds: float = 0.0
    teacher_evals: int = 0

    def final_loss(self, window: int = 5) -> list[float]:
        """Per-member mean of the last ``window`` logged losses."""
        return torch.tensor(self.loss[-window:]).mean(0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "grad_norm": self.grad_norm, "phase": self.phase,
                "seconds": self.seconds, "teacher_evals": self.teacher_evals}
