"""Reading a training config: YAML, dotted ``key=value`` overrides (values parsed as YAML) and the first
layout's keys (translated with a warning naming the new ones). Sections are built as their
dataclasses, which check their own values; ``TrainConfig`` then checks what spans sections.

    config = load_train_config("configs/tiny_cpu.yaml", ["optim.lr=1e-4", "train.steps=3"])
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import yaml

from .config import TrainConfig

logger = logging.getLogger(__name__)

def _build(cls, data: dict, where: str):
    """Instantiates dataclass ``cls`` from ``data``, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {where + ' ' if where else ''}config keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(sub, type):
            path = f"{where}.{name}" if where else name
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config section {path!r} must be a mapping of keys, got {type(value).__name__} "
                                 f"{value!r}")
            kwargs[name] = _build(sub, value or {}, path)
        else:
            kwargs[name] = _coerce(value, str(fields[name].type), f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """YAML reads ``3e-4`` as a string (YAML 1.1 wants ``3.0e-4``): convert numbers for float fields."""
    if isinstance(value, str) and annotation in ("float", "Optional[float]"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and annotation in ("float", "Optional[float]"):
        return float(value)
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``dotted.key=value`` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


LEGACY_KEYS = {
    "steps": "train.steps",
    "micro_batch_size": "train.micro_batch_size",
    "prompts_per_step": "rollout.tasks_per_rollout and train.global_batch_size",
    "curriculum.warmup_steps": "curriculum.warmup_rollouts",
}


def upgrade_legacy_keys(data: dict) -> dict:
    """Translates the first layout's keys: ``prompts_per_step`` P (one rollout of P prompts per
    optimizer step) becomes ``tasks_per_rollout = global_batch_size = P``, which reproduces those
    runs; ``steps`` / ``micro_batch_size`` move under ``train``; ``curriculum.warmup_steps`` (which
    counted steps = rollouts there) becomes ``curriculum.warmup_rollouts``."""
    data = dict(data)
    for section in ("train", "rollout", "curriculum"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping of keys, got "
                             f"{type(data[section]).__name__} {data[section]!r}")
    found = []
    train = dict(data.get("train") or {})
    rollout = dict(data.get("rollout") or {})
    curriculum = dict(data.get("curriculum") or {})
    for old, new in (("steps", "steps"), ("micro_batch_size", "micro_batch_size")):
        if old in data:
            found.append(old)
            train.setdefault(new, data.pop(old))
    if "prompts_per_step" in data:
        found.append("prompts_per_step")
        value = data.pop("prompts_per_step")
        rollout.setdefault("tasks_per_rollout", value)
        train.setdefault("global_batch_size", value)
    if "warmup_steps" in curriculum:
        found.append("curriculum.warmup_steps")
        curriculum.setdefault("warmup_rollouts", curriculum.pop("warmup_steps"))
    if not found:
        return data
    logger.warning("config keys %s are from the first config layout; read as %s", found,
                   [LEGACY_KEYS[k] for k in found])
    for key, value in (("train", train), ("rollout", rollout), ("curriculum", curriculum)):
        if value or key in data:
            data[key] = value
    return data


def train_config_from_dict(data: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    return _build(TrainConfig, upgrade_legacy_keys(apply_overrides(data, overrides)), "")


def load_train_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML training config and applies ``key=value`` overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ValueError(f"{path} is not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return train_config_from_dict(data, overrides)
