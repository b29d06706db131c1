"""Run configuration: pydantic models, YAML / JSON files and ``key=value`` overrides.

* Every model forbids unknown keys; validation errors are re-raised as ``ConfigError`` whose
  message holds one line per problem, naming the dotted key, the bad value and the allowed values /
  keys. Numbers are strict: a boolean is not a number (``train_steps=true`` is an error) and inf / nan
  are refused everywhere.
* Renamed keys: a model lists ``renamed_keys = {"old": "new"}``; the old name is refused with a
  message naming the new one (``distill.num_steps`` -> ``distill.grid_size``, ``distill.steps`` ->
  ``distill.train_steps``).
* ``load_config(Model, path, overrides)`` reads a YAML or JSON file (optional), applies dotted
  overrides such as ``["distill.method=direct_cd", "optim.lr=3e-4"]`` (values parsed as YAML, so
  numbers, booleans, lists and null work) and validates. Top-level keys starting with ``_`` (such as
  the ``_provenance`` block every run writes into its ``config.json``) are ignored, so a run's
  ``config.json`` is itself a valid ``--config`` file that reproduces the run.
* ``DistillConfig`` is the backend-agnostic part of a distillation run, shared by the toys and SDXL.

Command lines are parsed by ``odecm.cli`` (one override syntax for every entry point).
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "ConfigError",
    "StrictModel",
    "FLOAT32_MAX",
    "SOLVER_NAMES",
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


#: the largest finite float32 (learning rates and other values that reach float32 tensors stay below it)
FLOAT32_MAX = 3.4028234663852886e38

#: solver names of ``odecm.solvers`` a config may name: DDIM, EDM-form Euler / Heun in (x/alpha,
#: sigma/alpha), and the paper's VP-ODE Euler / Heun in (x, t)
SOLVER_NAMES = ("ddim", "euler", "heun", "euler_vp", "heun_vp")
SolverName = Literal["ddim", "euler", "heun", "euler_vp", "heun_vp"]


def _is_number_annotation(ann: Any) -> bool:
    """True for ``int``, ``float`` and optional / union forms of them (but not ``bool``)."""
    if ann is bool:
        return False
    if ann in (int, float):
        return True
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        return bool(args) and bool not in args and any(_is_number_annotation(a) for a in args)
    return False


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignment is validated, booleans are
    not numbers, inf / nan are refused, and keys listed in ``renamed_keys`` name their new spelling."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    #: old key -> new key (the old spelling is refused with a message naming the new one)
    renamed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in cls.renamed_keys.items():
                if old in data:
                    raise PydanticCustomError("renamed_key", "{old} was renamed to {new}", {"old": old, "new": new})
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, bool) and field is not None and _is_number_annotation(field.annotation):
            raise PydanticCustomError("bool_not_number", "expected a number, got a boolean")
        return value


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
    lr: float = Field(1e-4, gt=0, description="finite, > 0, representable in float32")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)

    @field_validator("lr")
    @classmethod
    def _float32_lr(cls, v: float) -> float:
        if v >= FLOAT32_MAX:
            raise ValueError("must be finite in float32 (below 3.4e38); allowed: 0 < lr < 3.4e38")
        return v


class DistillConfig(StrictModel):
    """What defines a CD / Direct CD run on any backend. ``grid_size`` is N, the number of grid
    intervals (the paper's N = 100); ``train_steps`` is the number of optimizer steps."""

    renamed_keys = {"num_steps": "grid_size", "steps": "train_steps"}

    method: Literal["cd", "direct_cd"] = "cd"
    solver: SolverName = "ddim"
    grid_size: int = Field(100, ge=1, description="N, the number of grid intervals")
    grid: Literal["skip", "uniform", "karras", "leading"] = "skip"
    boundary: Literal["lcm", "edm"] = "lcm"
    distance: Literal["l2", "l1", "pseudo_huber"] = "l2"
    huber_c: float = Field(0.001, gt=0)
    weighting: Literal["uniform", "snr", "karras"] = "uniform"
    index_scheme: Literal["per_sample", "shared"] = "per_sample"
    mask_mode: Literal["subset", "full"] = "subset"
    target: TargetConfig = TargetConfig()
    optim: OptimConfig = OptimConfig()
    train_steps: int = Field(250, ge=1, description="optimizer steps")
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
    """One line per problem: ``<dotted key>: <what is wrong> (<allowed>) (got <value>)``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "renamed_key":
            prefix = f"{key}." if key != "<root>" else ""
            lines.append(f"{prefix}{e['ctx']['old']}: renamed; use {prefix}{e['ctx']['new']}")
            continue
        if e["type"] == "extra_forbidden":
            allowed = _allowed_for(model, loc)
            msg = f"unknown key; {allowed}" if allowed else "unknown key"
        elif e["type"] == "literal_error":
            lines.append(f"{key}: {e.get('input')!r} is not allowed; {_allowed_for(model, loc) or msg}")
            continue
        else:
            allowed = _allowed_for(model, loc)
            if allowed and "allowed" not in msg:
                msg = f"{msg} ({allowed})"
        value = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{key}: {msg}{shown}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict, values parsed as YAML scalars / lists.

    A key given twice, or a key together with one of its sub-keys (``train={...}`` and
    ``train.lr=...``), is an error naming both overrides."""
    out: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: the key is empty or has an empty part")
        for other, other_item in seen.items():
            if key == other or key.startswith(other + ".") or other.startswith(key + "."):
                raise ConfigError(f"{key}: given twice ({other_item!r} and {item!r}); give each key once")
        seen[key] = item
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: the value {raw!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
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
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    # provenance and other bookkeeping blocks of a run's config.json start with "_"
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


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


def save_config(cfg: BaseModel, path: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Write the fully resolved config as JSON (or YAML when the suffix is .yaml / .yml); the file is
    itself a valid ``--config``. ``provenance`` (``odecm.cli.provenance()``: git commit, versions,
    argv) is stored under ``_provenance``, which loading ignores."""
    path = Path(path)
    data = config_to_dict(cfg)
    if provenance is not None:
        data["_provenance"] = provenance
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))
