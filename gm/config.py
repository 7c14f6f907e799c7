"""Load sections of ``params.yaml`` into frozen dataclasses.

Every key is checked: an unknown key, a value of the wrong type or a value out of range is a
``ConfigError`` that names the file and the dotted key (``params.yaml: datasets.emoji.fit``).
Dataclass fields carry their own validation in ``__post_init__`` through :func:`check`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from gm.errors import ConfigError

T = TypeVar("T")


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax.

    PyYAML implements YAML 1.1, whose floats need a dot: ``lr: 5e-4`` loads as the string
    ``'5e-4'`` (yaml/pyyaml#173), while DVC (ruamel.yaml, YAML 1.2) and Hydra's ``-S`` read it
    as the number 0.0005. This loader reads ``5e-4``, ``1E3`` and ``.5`` as floats, so a params
    file means the same number to gm and to DVC; everything else loads as ``safe_load`` does.
    """


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text as :class:`Loader` reads it (``yaml.safe_load`` with YAML 1.2 floats).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a safe loader


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def check(ok: bool, key: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raise a ConfigError on ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_literal(value: Any, tp: Any, key: str) -> Any:
    """``value`` if it is one of the ``Literal[...]`` type ``tp``'s choices.

    Raises:
        ConfigError: naming ``key``, the value and the choices, otherwise.
    """
    if value not in get_args(tp):
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    return value


def _json_key(key: Any, tp: Any) -> Any:
    """An ``int`` mapping key that went through JSON (a checkpoint's config) comes back as a
    string of digits: read it as the int again; anything else is left for ``_convert``."""
    if tp is int and isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key):
        return int(key)
    return key


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        return check_literal(value, tp, key)
    if origin in (typing.Union, types.UnionType):
        for alt in get_args(tp):
            try:
                return _convert(value, alt, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp)
        return {_convert(_json_key(k, k_tp), k_tp, key): _convert(v, v_tp, f"{key}.{k}")
                for k, v in value.items()}  # fmt: skip
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def from_dict(cls: type[T], data: dict[str, Any], key: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values name ``key.field``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{key}." if key else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (expected one of: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            default = _default(f)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                # A partial section overrides the keys it names and keeps the field's own
                # default for the others: `optim: {lr: 5e-4}` keeps the family's betas and
                # gradient clipping, not the bare OptimConfig's.
                value = _merge(to_dict(default), value)
            kwargs[name] = _convert(value, hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the bare field; give them their full path.
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) else prefix + msg) from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass → plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
