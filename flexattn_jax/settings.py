"""Command-line options derived from settings dataclasses: each field is declared once, its docstring is its help.

A field's help is ``field(metadata={"help": ...})`` or the string literal written under it in the class body; its
flag is ``--`` + the field name with dashes (a nested dataclass field ``lora: LoraConfig`` gives ``--lora-rank``);
its default is the dataclass's. Types: int, float, str, bool (``--x`` / ``--no-x``), ``Literal`` (choices),
``tuple[T, ...]`` (a comma list), ``X | None`` (``none`` gives None) and nested dataclasses.

One small generator rather than ``tyro`` or ``draccus``: the commands mix these fields with options that are no
settings (``--checkpoint``, ``--mesh``, ``--set``) in one argparse parser, keep their established spellings
(``--no-shuffle``, ``--data-seed``, comma lists) and parse a flag's text with the same function as ``--set key=value``
(:func:`flexattn_jax.overrides.parse_value`); a library would bring a second parser and its own naming rules.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from collections.abc import Callable, Mapping
from typing import Any

from flexattn_jax.overrides import optional_inner, parse_value


def field_docs(cls: type) -> dict[str, str]:
    """Each field's help text: its ``metadata['help']``, else the string literal right under it in the class body."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (e.g. a class made at run time)
        tree = None
    if tree is not None:
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return docs


def show_default(value: Any) -> str:
    """A default as the command line spells it: ``none``, ``true``/``false``, comma lists, numbers as repr."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "''"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


class SettingError(ValueError):
    """A setting's bad value, its message naming fields as ``{field}``: spelled as the field (``str(e)``) or, from the
    command line, as its flag (:meth:`SettingsArgs.build`), so a bad value is one line naming what the user typed."""

    def __init__(self, template: str):
        super().__init__(template)
        self.template = template

    def spelled(self, name: Callable[[str], str]) -> str:
        """The message with each ``{field}`` written as ``name(field)``."""
        return re.sub(r"\{([a-z_][a-z0-9_.]*)\}", lambda m: name(m.group(1)), self.template)

    def __str__(self) -> str:
        return self.spelled(lambda f: f)


@dataclasses.dataclass(frozen=True)
class SettingsArgs:
    """The options of one settings dataclass ``cls`` on an argparse parser, and the instance built back from them.

    ``flags`` renames a field's flag (``{"seed": "--data-seed"}``); ``defaults`` gives a field another argparse
    default with the text shown for it (``{"seed": (None, "--seed")}``), which :meth:`build`'s caller resolves.
    A nested dataclass field gets its fields' flags under ``--NAME-`` (renames there as ``{"lora.rank": ...}``).
    ``only`` limits the flags to those fields (a command exposing some of the settings; the others keep their defaults).
    """

    cls: type
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    only: tuple[str, ...] = ()

    def fields(self) -> list[tuple[str, Any, Any, str]]:
        """``(dotted name, type, default, help)`` of every leaf field with a flag, nested dataclasses flattened."""
        leaves = _leaves(self.cls, "")
        unknown = set(self.only) - {name for name, *_ in leaves}
        if unknown:
            raise TypeError(f"{self.cls.__name__} has no field {sorted(unknown)[0]!r}")
        return [leaf for leaf in leaves if not self.only or leaf[0] in self.only]

    def flag(self, name: str) -> str:
        """The flag of the dotted field ``name``."""
        return self.flags.get(name, "--" + name.replace(".", "-").replace("_", "-"))

    def dest(self, name: str) -> str:
        """The argparse attribute of the dotted field ``name``."""
        return self.flag(name).lstrip("-").replace("-", "_")

    def add(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add a flag for every field, its help the field's docstring and its default the dataclass's."""
        for name, typ, default, doc in self.fields():
            if not doc:
                raise TypeError(f"{self.cls.__name__}.{name} has no docstring (the help of {self.flag(name)})")
            default, shown = self.defaults.get(name, (default, show_default(default)))
            flag, help_text = self.flag(name), f"{doc} (default: {shown})"
            inner = optional_inner(typ)
            if inner is bool:
                action = parser.add_argument(flag, dest=self.dest(name), action=argparse.BooleanOptionalAction, default=default)
                action.help = help_text  # argparse < 3.14 appends its own default otherwise
                continue
            choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None
            parser.add_argument(flag, dest=self.dest(name), type=_reader(typ, flag), default=default, choices=choices,
                                metavar=_metavar(inner, choices), help=help_text)

    def build(self, ns: argparse.Namespace, **given: Any) -> Any:
        """The dataclass from parsed arguments; ``given`` (dotted names) replace what the arguments say.

        A :class:`SettingError` of the dataclass's checks is raised again as a ValueError naming the flags."""
        values = {name: getattr(ns, self.dest(name)) for name, *_ in self.fields()}
        values.update(given)
        try:
            return _construct(self.cls, values, "")
        except SettingError as e:
            raise ValueError(e.spelled(self.flag)) from None


def _leaves(cls: type, prefix: str) -> list[tuple[str, Any, Any, str]]:
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += _leaves(typ, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((prefix + f.name, typ, default, docs.get(f.name, "")))
    return out


def _construct(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], values, f"{prefix}{f.name}.")
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def _reader(typ: Any, flag: str) -> Any:
    """argparse's ``type=``: the text parsed by the field's type (a ValueError becomes argparse's one-line error)."""

    def read(text: str) -> Any:
        return parse_value(text, typ, flag)

    read.__name__ = getattr(optional_inner(typ), "__name__", "value")
    return read


def _metavar(typ: Any, choices: tuple[Any, ...] | None) -> str | None:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    if typing.get_origin(typ) is tuple:
        return "A,B,..."
    return {int: "N", float: "X", str: "TEXT"}.get(typ)
