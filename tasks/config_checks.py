"""How :mod:`tasks.config` checks a parsed ``params.yaml``: the value rules a section's fields
declare (:func:`rule`) and the builder that applies them (:func:`build_checked`).

A raw mapping goes in with the dataclass it should become; out comes the frozen instance, or
one :class:`~tasks.errors.MedtransferError` line naming the key: an unknown or missing key, a
value of the wrong type (``int``, ``float``, ``bool``, ``str``, a tuple of them, a nested
section, ``| None``) or outside its rule. A section with a ``check()`` method runs it last
(its cross-field rules).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from tasks.errors import MedtransferError


def rule(**checks: Any) -> Any:
    """A required dataclass field with value checks: ``choices`` (allowed values), ``min`` and
    ``max`` (inclusive), ``above`` (exclusive lower bound), ``multiple_of`` (an integer step)."""
    return field(metadata=checks)


def build_checked(cls: type, raw: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``raw`` found at ``where``."""
    name = where or "params.yaml"
    if not isinstance(raw, Mapping):
        raise MedtransferError(
            f"{name} must be a mapping of keys, not {_shown(raw)}; see the shipped params.yaml."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise MedtransferError(
            f"Unknown key {_join(where, unknown[0])!r}; the keys of {name} are {sorted(fields)}."
        )
    missing = [key for key in fields if key not in raw]
    if missing:
        raise MedtransferError(
            f"{name} lacks {_join(where, missing[0])!r}; add it (the shipped params.yaml has "
            "every key, with comments)."
        )
    hints = typing.get_type_hints(cls)
    values = {
        key: _value(hints[key], raw[key], _join(where, key), fields[key].metadata) for key in fields
    }
    instance = cls(**values)
    if hasattr(instance, "check"):
        instance.check()
    return instance


def _value(hint: Any, value: Any, key: str, checks: Mapping[str, Any]) -> Any:
    """``value`` checked against the type ``hint`` and ``checks``; returns the typed value."""
    if dataclasses.is_dataclass(hint):
        return build_checked(hint, value, key)
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise MedtransferError(f"{key} must be set ({_expected(hint)}), not null.")
    inner = next(t for t in allowed if t is not type(None))
    if typing.get_origin(inner) is tuple:
        element = typing.get_args(inner)[0]
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_scalar(element, item, key, checks) for item in items)
    return _scalar(inner, value, key, checks)


def _scalar(kind: type, value: Any, key: str, checks: Mapping[str, Any]) -> Any:
    """One ``int``, ``float``, ``bool`` or ``str`` value, checked against ``checks``."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        # `-S eval.threshold=0.5` reads as a YAML number; a text field takes its spelling.
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    if not ok:
        raise MedtransferError(f"{key} must be {_expected(kind)}, not {_shown(value)}.")
    _check_range(value, key, checks)
    return value


def _check_range(value: Any, key: str, checks: Mapping[str, Any]) -> None:
    if "choices" in checks and value not in checks["choices"]:
        raise MedtransferError(f"{key} must be one of {list(checks['choices'])}, not {value!r}.")
    if "min" in checks and value < checks["min"]:
        raise MedtransferError(f"{key} must be at least {checks['min']}, not {value!r}.")
    if "max" in checks and value > checks["max"]:
        raise MedtransferError(f"{key} must be at most {checks['max']}, not {value!r}.")
    if "above" in checks and value <= checks["above"]:
        raise MedtransferError(f"{key} must be greater than {checks['above']}, not {value!r}.")
    step = checks.get("multiple_of")
    if step and value % step:
        below, above = value - value % step, value - value % step + step
        nearest = " or ".join(str(v) for v in (below, above) if v >= checks.get("min", step))
        raise MedtransferError(
            f"{key} must be a multiple of {step}, not {value!r} (nearest: {nearest})."
        )


def _expected(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if isinstance(hint, types.UnionType):
        return " or ".join(_expected(t) for t in typing.get_args(hint) if t is not type(None))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_expected(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else text


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
