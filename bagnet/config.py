"""Typed configs: YAML files plus dotted ``key=value`` overrides, validated into dataclasses.

Every job uses :func:`load_config`. Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the offending key, before any expensive work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key (and the file, if any)."""


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where YAML 1.1 surprises: a key given twice in one mapping is
    an error (YAML keeps the last silently), and ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a later one would replace the earlier one)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str | bytes) -> Any:
    """``text`` parsed with :class:`ConfigLoader` (the one YAML reading rule of configs)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(value: str, key: str) -> None:
    """ConfigError naming ``key`` unless ``value`` is a single safe path segment: ASCII letters,
    digits, ``.``, ``_`` and ``-``, starting with a letter or digit (so no ``..``, no ``/``, not
    absolute, no hidden or ``_``-prefixed name that readers skip). Used for ``run.name``,
    ``tune.name`` and ``run_id``, which name folders on storage."""
    if not (isinstance(value, str) and SAFE_NAME.fullmatch(value) and value not in (".", "..")):
        raise ConfigError(f"{key}: {value!r} is not a safe folder name: use ASCII letters, digits, '.', '_' "
                          "and '-', starting with a letter or digit (no '/', no '..', no spaces)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "model.name=bagnet9_small"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        try:
            node[leaf] = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: invalid YAML: {err}") from None
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) and dotted overrides; validates every key."""
    raw = read_yaml(path) if path else {}
    raw = merge(raw, parse_overrides(overrides or []))
    where = f"{path}: " if path else ""
    try:
        return from_dict(cls, raw)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Validate a mapping into dataclass ``cls``; keys are reported with their dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under "
            f"{prefix.rstrip('.') or 'top level'}: {', '.join(sorted(fields))})"
        )
    values = {name: _coerce(hints[name], data[name], prefix + name) for name in fields if name in data}
    try:
        obj = cls(**values)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from None
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists) for YAML/JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def updated(obj: T, changes: dict[str, Any]) -> T:
    """A validated copy of config ``obj`` with ``changes`` (a nested mapping) merged in."""
    return from_dict(type(obj), merge(to_dict(obj), changes))


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError ``key: message`` unless ``condition``; for ``validate()`` methods."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


__all__ = [
    "ConfigError", "ConfigLoader", "parse_yaml", "check_name", "load_config", "from_dict", "parse_overrides", "merge", "read_yaml",
    "to_dict", "updated", "dump_yaml", "require",
]
