"""YAML loading: `base:` chains, `--set key=value` overrides, typed coercion with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from hybrid_megatron.config.schema import RunConfig
from hybrid_megatron.errors import ConfigError

# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of options, got {value!r}.")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-5" as a string
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be of type {_type_name(tp)}, got {value!r}.")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"Unknown config key '{path}'.{hint} Valid keys here: {sorted(names)}."
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config (for saving next to checkpoints and results)."""
    return dataclasses.asdict(cfg)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config; a top-level `base: other.yaml` (relative to this file) is loaded
    first and this file's keys are merged over it, section by section."""
    if not path.is_file():
        raise ConfigError(
            f"Config file not found: {path}. Pass a YAML file such as configs/tiny.yaml."
        )
    if path.resolve() in chain:
        raise ConfigError(
            f"Config {path} includes itself through `base:` ({' -> '.join(map(str, chain))})."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at top level.")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base` must be a path to another YAML config, got {base!r}.")
    merged = _read_yaml(path.parent / base, (*chain, path.resolve()))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML run config; `overrides` are `a.b.c=value` strings."""
    data = _read_yaml(Path(path))
    for item in overrides or []:
        apply_override(data, item)
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg


def apply_override(data: dict, item: str) -> None:
    """Apply one `dotted.key=value` override to a raw config dict.

    The value is parsed as YAML (numbers, booleans, lists); text YAML cannot parse, such as a
    layer pattern starting with `*` (a YAML alias), is taken as a plain string.
    """
    if "=" not in item:
        raise ConfigError(f"Override '{item}' must look like section.key=value.")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{item}': '{part}' is not a section.")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw.strip()
    node[parts[-1]] = value
