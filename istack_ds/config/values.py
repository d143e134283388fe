"""Typed values: one leaf checked and coerced against its annotation, a section built from a mapping.

Every key of the run configuration passes through :func:`_coerce` (a ``Literal`` holds one of its
choices, an int is an int, every float is finite) whether it is loaded from YAML (:func:`_build`) or the
section is built in code (:func:`_check_fields` from its ``__post_init__``); every error is a
:class:`ConfigError` that names the dotted key (an unknown key with the known key closest to it, "did you
mean"). :func:`field_docs` reads the docstring under each field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad key or value in a run configuration; the message names the key."""


def _holds_float(hint: Any) -> bool:
    return hint is float or any(_holds_float(a) for a in typing.get_args(hint))


def _check_fields(section, prefix: str) -> None:
    """Every ``Literal`` field holds one of its values and every float is finite, as :func:`_coerce` checks on
    loading (sections built in code do not pass through it)."""
    for name, hint in _type_hints(type(section)).items():
        if typing.get_origin(hint) is Literal or _holds_float(hint):
            _coerce(f"{prefix}.{name}", getattr(section, name), hint)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    # Written so that NaN fails too (every comparison with NaN is false).
    if not (value > 0 or (allow_zero and value == 0)):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks / converts one leaf value against its annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        # Coerced as the choices' type first (YAML may give 2.0 for 2), then checked against them.
        value = _coerce(key, value, type(args[0]))
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        # NOTE: the one finiteness check of every float key, loaded or built in code (_check_fields):
        # nan passes every `<`/`>` range check and inf passes the lower bounds.
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


def _build(cls, values: dict, prefix: str):
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"section `{prefix}`" if prefix else "the top level"
        dotted = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        guess = f" (did you mean `{dotted}{close[0]}`?)" if close else ""
        raise ConfigError(f"unknown key `{dotted}{unknown[0]}` in {where}{guess}; known keys: {names}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"`{key}` must be a mapping of keys to values")
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, value, hint)
    return cls(**kwargs)


def field_docs(cls) -> dict[str, str]:
    """The docstring of each field of a config section (read from the source)."""
    import ast
    import inspect

    (class_def,) = ast.parse(inspect.getsource(cls)).body
    assert isinstance(class_def, ast.ClassDef), cls
    body = class_def.body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs
