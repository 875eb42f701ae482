"""The machinery of nacd's typed configs, independent of their fields: documented dataclass fields,
building a dataclass from a (partial) mapping with its types and values checked, dotted ``key=value``
overrides, YAML in and out. :mod:`nacd.config` holds the fields themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from nacd.errors import ConfigError


def f(default: Any, doc: str) -> Any:
    """A dataclass field with a default (copied if mutable) and a one-line doc."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        import copy

        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class FieldError(ValueError):
    """Raised by ``__post_init__`` checks; turned into a ConfigError with the full key."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise FieldError(name, message)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{type_name(k)}, {type_name(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert strings from the command line."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key '{key}': expected {type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key + ".")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise bad
    if tp in (int, float):  # bools are ints to Python, not to a config; "2.5" is no int
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                raise bad from None
        if tp is int and isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise bad
        if isinstance(value, (int, float)):
            return tp(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) mapping, checking keys, types and values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"config key '{prefix}{exc.name}': {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a config dataclass."""
    return dataclasses.asdict(cfg)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key '{where}': index out of range (the list has {len(node)} items)")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"config key '{where}': '{'.'.join(parts[:i])}' is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. distill.syn_steps=8")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "fields":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


#: The top-level key of a config file that names the file it starts from.
EXTENDS = "extends"


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping. ``extends: other.yaml`` (a path relative to this file) starts from that
    file's mapping, resolved the same way, and merges this one over it: mappings key by key, lists and
    values replaced whole (so a file lists all of ``data.sources`` when it changes them)."""
    path = Path(path)
    if not path.is_file():
        by = f" (extended by {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{by}")
    if path.resolve() in {p.resolve() for p in _chain}:
        loop = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{_chain[-1]}: '{EXTENDS}' goes round in a circle: {loop}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, model, data, ...)")
    if EXTENDS not in data:
        return data
    parent = data.pop(EXTENDS)
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: '{EXTENDS}' must be the path of another config file, got {parent!r}")
    return deep_merge(load_yaml(path.parent / parent, (*_chain, path)), data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def explain(obj: Any, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, value, doc) for every leaf field of a config instance (``Config()``: the defaults)."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(type(obj))
    for fld in dataclasses.fields(obj):
        tp = hints[fld.name]
        key = prefix + fld.name
        value = getattr(obj, fld.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(value, key + "."))
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [to_dict(v) for v in value]
        rows.append((key, type_name(tp), value, fld.metadata.get("doc", "")))
    return rows
