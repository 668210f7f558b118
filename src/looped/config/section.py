"""Config sections' machinery: type and choice checks from annotations, documented fields (ConfigError, re-exported
here, is defined in looped.errors)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

from looped.errors import ConfigError


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _literal_choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def _check_value(section: str, name: str, tp: Any, value: Any) -> None:
    """Type-check one field against its annotation (Literal, int, float, bool, str, list, dict, Optional)."""
    where = f"{section}.{name}"
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        _, value_tp = typing.get_args(tp) or (str, Any)
        for key, item in value.items():
            _check_value(section, f"{name}.{key}", value_tp, item)
        return
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                _check_value(section, name, arg, value)
                return
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    choices = _literal_choices(tp)
    if choices is not None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{where} = {value!r} is not one of {allowed}")
        return
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        for item in value:
            _check_value(section, name, item_tp, item)
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")


def _accepts_float(tp: Any) -> bool:
    return tp is float or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)
    )


class Section:
    """Base for config sections: type and choice validation from the annotations, dict conversion."""

    _section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _accepts_float(hints[f.name]) and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            if isinstance(value, tuple):
                setattr(self, f.name, list(value))
            _check_value(self._section, f.name, hints[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise ConfigError naming the field."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """The one-line docstring of each field (from its metadata)."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})
