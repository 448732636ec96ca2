"""The CLI's dotted overrides (``--set flex.threshold=48``) and the one reader of an HR budget given as text."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from flexattn_jax.config import ADAPTIVE, ConfigError, FlexConfig, ModelConfig, ProjectorConfig, TextConfig, VisionConfig


def parse_hr_budget(text: str | float | None, name: str = "hr_budget") -> float | int | str | None:
    """The one reader of an HR budget given as text (``--hr-budget``, ``--set flex.hr_budget=``).

    ``None`` / ``'all'`` / ``'none'`` -> None (all M tokens); ``'adaptive'`` -> the ladder; an integer -> a count >= 1; a number with a
    point or exponent -> a fraction in (0, 1]. Anything else raises :class:`ConfigError` naming ``name`` and the value.
    """
    if text is None or isinstance(text, int | float) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip()
        if t.lower() in ("all", "none", "null"):
            return None
        if t.lower() == ADAPTIVE:
            return ADAPTIVE
        try:
            value = int(t)
        except ValueError:
            try:
                value = float(t)
            except ValueError:
                raise ConfigError(f"{name} {text!r}: use a count (e.g. 64), a fraction in (0, 1] (e.g. 0.25), 'all', 'adaptive'") from None
    if value is not None and ((isinstance(value, float) and not 0 < value <= 1) or (isinstance(value, int) and value < 1)):
        raise ConfigError(f"{name} {text!r}: use a count >= 1, a fraction in (0, 1], 'all' or 'adaptive'")
    return value


def optional_inner(typ: Any) -> Any:
    """``X`` for a field typed ``X | None`` (one other member), else ``typ`` itself."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return typ


def parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse a setting's text by the dataclass field's type ``typ`` (``--set`` and the generated flags alike).

    ``X | None`` takes ``none``/``null``; a ``tuple[T, ...]`` a comma list (or a JSON list); a mismatch raises
    :class:`ConfigError` naming ``key``.
    """
    low = text.strip().lower()
    if key == "flex.hr_budget":
        return parse_hr_budget(text, name=key)
    inner = optional_inner(typ)
    if inner is not typ and low in ("none", "null"):
        return None
    typ = inner
    if typ is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if typing.get_origin(typ) is Literal:
        if text not in typ.__args__:
            raise ConfigError(f"{key}={text!r}: use one of {', '.join(map(repr, typ.__args__))}")
        return text
    if typ is str:
        return text
    if typing.get_origin(typ) is tuple and not text.strip().startswith("["):
        item = typing.get_args(typ)[0]
        return tuple(parse_value(t.strip(), item, key) for t in text.split(",") if t.strip())
    if low in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if typing.get_origin(typ) is tuple and isinstance(value, list) else value


def replace_settings(obj: Any, overrides: list[tuple[str, str]], what: str) -> Any:
    """The settings dataclass ``obj`` with dotted fields (``lr``, ``lora.rank``) set from text, validated once.

    An unknown field raises :class:`ConfigError` naming ``what`` + the key (e.g. ``unknown train setting 'lrr'``).
    """
    for key, text in overrides:
        obj = _replace_path(obj, key.split("."), text, f"{what}.{key}", what)
    return obj


def _replace_path(obj: Any, parts: list[str], text: str, key: str, what: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if parts[0] not in names:
        raise ConfigError(f"unknown {what} setting {key.partition('.')[2]!r}")
    typ = typing.get_type_hints(type(obj))[parts[0]]
    if dataclasses.is_dataclass(typ):
        if len(parts) == 1:
            raise ConfigError(f"{key} is a group of settings: set one of its fields ({key}.NAME=VALUE)")
        value = _replace_path(getattr(obj, parts[0]), parts[1:], text, key, what)
    elif len(parts) > 1:
        raise ConfigError(f"unknown {what} setting {key.partition('.')[2]!r}")
    else:
        value = parse_value(text, typ, key)
    return dataclasses.replace(obj, **{parts[0]: value})


def apply_overrides(cfg: ModelConfig, overrides: list[str] | dict[str, Any]) -> ModelConfig:
    """Return ``cfg`` with dotted fields replaced, e.g. ``["flex.threshold=48", "dtype=bfloat16"]``.

    All overrides are applied before the result is validated (once), so fields that must change
    together can be changed together. An unknown field name raises :class:`ConfigError` naming it.
    """
    return ModelConfig.from_dict(override_dict(cfg.to_dict(), overrides))


def override_dict(d: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig.to_dict()`` form with the overrides applied (string values parsed by the field's type)."""
    items = overrides.items() if isinstance(overrides, dict) else [split_override(o) for o in overrides]
    sections = ("vision", "text", "projector", "flex")
    d = {k: dict(v) if k in sections else v for k, v in d.items()}
    for key, value in items:
        parts = key.split(".")
        if len(parts) == 1 and key in d and key not in sections:
            node, name = d, key
        elif len(parts) == 2 and parts[0] in sections and parts[1] in d[parts[0]]:
            node, name = d[parts[0]], parts[1]
        else:
            raise ConfigError(f"unknown config field {key!r}")
        node[name] = parse_value(value, _field_type(key), key) if isinstance(value, str) else value
    return d


def _field_type(key: str) -> Any:
    """The resolved type annotation of a dotted field name (e.g. ``flex.threshold`` -> float)."""
    section, _, name = key.rpartition(".")
    classes = {"": ModelConfig, "vision": VisionConfig, "text": TextConfig, "projector": ProjectorConfig, "flex": FlexConfig}
    return typing.get_type_hints(classes[section])[name]


def split_override(text: str) -> tuple[str, str]:
    """``'key=value'`` -> ``('key', 'value')``; text without ``=`` raises :class:`ConfigError`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()
