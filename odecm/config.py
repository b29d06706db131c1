"""Run configuration: pydantic models, YAML / JSON files and ``key=value`` overrides.

* Every model forbids unknown keys; validation errors are re-raised as ``ConfigError`` whose
  message names the dotted key, the bad value and the allowed values / keys.
* ``load_config(Model, path, overrides)`` reads a YAML or JSON file (optional), applies dotted
  overrides such as ``["distill.method=direct_cd", "optim.lr=3e-4"]`` (values parsed as YAML, so
  numbers, booleans, lists and null work) and validates.
* ``DistillConfig`` is the backend-agnostic part of a distillation run, shared by the toys and SDXL.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "StrictModel",
    "TargetConfig",
    "OptimConfig",
    "DistillConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_to_dict",
    "save_config",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetConfig(StrictModel):
    """Target network policy: ``ema`` with ``ema_rate`` in [0, 1) or ``stopgrad`` (= EMA rate 0)."""

    policy: Literal["stopgrad", "ema"] = "stopgrad"
    ema_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.policy == "stopgrad" and self.ema_rate != 0.0:
            raise ValueError("target.ema_rate must be 0 when target.policy='stopgrad' (use policy='ema')")
        return self

    @property
    def rate(self) -> float:
        return 0.0 if self.policy == "stopgrad" else self.ema_rate


class OptimConfig(StrictModel):
    name: Literal["adam", "adamw", "adamw8bit", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)


class DistillConfig(StrictModel):
    """What defines a CD / Direct CD run on any backend."""

    method: Literal["cd", "direct_cd"] = "cd"
    solver: Literal["ddim", "euler", "heun"] = "ddim"
    num_steps: int = Field(100, ge=1, description="N, the number of grid intervals")
    grid: Literal["skip", "uniform", "karras", "leading"] = "skip"
    boundary: Literal["lcm", "edm"] = "lcm"
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    huber_c: float = Field(0.001, gt=0)
    weighting: Literal["uniform", "snr", "karras"] = "uniform"
    index_scheme: Literal["per_sample", "shared"] = "per_sample"
    mask_mode: Literal["subset", "full"] = "subset"
    target: TargetConfig = TargetConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = Field(250, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    max_nonfinite: int = Field(10, ge=0)


def _allowed_for(model: type[BaseModel], loc: tuple) -> str | None:
    """The allowed keys or values at ``loc`` of ``model``, for error messages."""
    cur: Any = model
    for i, part in enumerate(loc):
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        if part not in cur.model_fields:
            return f"allowed keys: {sorted(cur.model_fields)}"
        ann = cur.model_fields[part].annotation
        if i == len(loc) - 1:
            choices = get_args(ann) if getattr(ann, "__origin__", None) is Literal else None
            return f"allowed values: {list(choices)}" if choices else None
        cur = ann
    return None


def _format_errors(model: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_for(model, loc)
            msg = f"unknown key; {allowed}" if allowed else "unknown key"
        else:
            allowed = _allowed_for(model, loc)
            if allowed and "allowed" not in msg:
                msg = f"{msg} ({allowed})"
        value = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{key}: {msg}{shown}")
    return f"invalid {model.__name__} config:\n  " + "\n  ".join(lines)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict, values parsed as YAML scalars / lists."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        cur = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        cur[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    return _merge(data, parse_overrides(overrides))


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(model, err)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> M:
    """Validate ``base`` <- file at ``path`` <- ``overrides`` as ``model``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, read_config_file(path))
    data = apply_overrides(data, overrides)
    return validate(model, data)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the fully resolved config as JSON (or YAML when the suffix is .yaml / .yml)."""
    path = Path(path)
    data = config_to_dict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))
