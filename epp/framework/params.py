"""Typed plugin parameters.

Each plugin declares its ``parameters`` as a dataclass. ``decode_params`` turns the raw
YAML/JSON value into that dataclass, checking types strictly (a wrong type is an error
naming the key) and reporting unknown keys as warnings: upstream silently ignores them,
we tell the user.

Field names are the upstream camelCase names, so the dataclass doubles as documentation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal, Mapping, TypeVar, Union, get_args, get_origin

from epp.framework.durations import parse_duration

T = TypeVar("T")


class ParameterError(ValueError):
    """A plugin parameter has the wrong type or value. ``key`` is a dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"parameter '{key}': {message}" if key else message)
        self.key = key
        self.message = message


class Duration(float):
    """Seconds, written in config as a Go duration string ("500ms") or a number of seconds."""


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "duration (e.g. '500ms')"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "dict": "mapping", "list": "list"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, warn: Callable[[str], None]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, warn)
            except ParameterError as e:
                errors.append(e.message)
        raise ParameterError(key, "; ".join(errors))
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ParameterError(key, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if tp is Duration:
        try:
            return Duration(parse_duration(value))
        except ValueError as e:
            raise ParameterError(key, str(e)) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParameterError(key, f"expected boolean, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParameterError(key, f"expected integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterError(key, f"expected number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParameterError(key, f"expected string, got {_describe(value)}")
        return value
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            raise ParameterError(key, f"expected list, got {_describe(value)}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(item_tp, v, f"{key}[{i}]", warn) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ParameterError(key, f"expected mapping, got {_describe(value)}")
        args = get_args(tp) or (str, Any)
        return {
            _coerce(args[0], k, f"{key}.{k}", warn): _coerce(args[1], v, f"{key}.{k}", warn)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, key, warn)
    raise ParameterError(key, f"unsupported parameter type {_type_name(tp)}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"[:80]


def _decode_dataclass(cls: type[T], raw: Any, prefix: str, warn: Callable[[str], None]) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParameterError(prefix, f"expected a mapping of parameters, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases = getattr(cls, "__param_aliases__", {})
    values: dict[str, Any] = {}
    for k, v in raw.items():
        name = aliases.get(k, k)
        path = f"{prefix}.{k}" if prefix else str(k)
        if name not in fields:
            warn(f"unknown parameter '{path}' is ignored (known: {', '.join(sorted(fields)) or 'none'})")
            continue
        values[name] = _coerce(hints[name], v, path, warn)
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParameterError(prefix + "." + missing[0] if prefix else missing[0], "is required")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            if isinstance(e, ParameterError):
                raise
            raise ParameterError(prefix, str(e)) from None
    return obj


def decode_params(cls: type[T], raw: Any, warn: Callable[[str], None] | None = None) -> T:
    """Decode raw ``parameters`` into the dataclass ``cls``.

    ``cls`` may define ``validate(self)`` raising ValueError for cross-field rules, and a
    class attribute ``__param_aliases__`` mapping accepted spellings to field names.
    """
    return _decode_dataclass(cls, raw, "", warn or (lambda _msg: None))


@dataclasses.dataclass
class NoParams:
    """For plugins without parameters: any key given is reported as unknown."""


def params_to_dict(obj: Any) -> dict[str, Any]:
    """The effective parameters of a plugin, for `epp check-config` output."""
    if obj is None or not dataclasses.is_dataclass(obj):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Duration):
            from epp.framework.durations import format_duration

            v = format_duration(float(v))
        elif dataclasses.is_dataclass(v):
            v = params_to_dict(v)
        elif isinstance(v, list):
            v = [params_to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
