"""Recipes: a dataclass (TrainConfig, FinetuneConfig, ...) built from a YAML file and dotted overrides.

The same dataclasses back the YAML recipes, the Python API and the command line (gptlab/cli builds its
options from `options(cls)`), so a recipe cannot name an option that does not exist: unknown keys, values
of the wrong type and values outside a field's choices are errors that name the key.

A recipe class may declare, as ClassVars:
    RENAMED        {old key: field}: earlier spellings of a field, still read (e.g. max_len -> seq_len)
    ALIASES        {field: {other value: value}}: other names of a choice (e.g. task classify -> classification)
    SET_ELSEWHERE  {field: why}: fields a run sets itself (vocab_size comes from the data); setting them is an error
    LISTED         field names `--help` shows (default: all); the others are accepted, documented in docs/
    GROUP          the heading of the class's own fields in `--help`
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gptlab.errors import GptlabError


def is_recipe(tp: Any) -> bool:
    """Whether a parameter type is a recipe (a dataclass of options)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_docs(cls: type) -> dict[str, str]:
    """Help for dataclass fields from the `#` comment after each in the source (a subclass's own comment
    wins over its bases')."""
    helps: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M):
            helps.setdefault(m.group(1), m.group(2).strip())
    return helps


def unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X (other unions as they are)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@dataclass(frozen=True)
class Option:
    """One field of a recipe, nested dataclasses flattened to dotted names (`model.n_layer`)."""

    name: str  # dotted
    type: Any
    default: Any
    help: str
    group: str  # the heading it is listed under
    listed: bool  # shown by --help (every option is accepted)
    aliases: dict[str, str]  # other names of its values


def _declared_in(cls: type, name: str) -> type:
    """The class of cls's MRO that first declares field `name` (its group)."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}) and dataclasses.is_dataclass(klass):
            return klass
    return cls


def options(cls: type, prefix: str = "", group: str | None = None) -> list[Option]:
    """Every field of `cls`, in declaration order; fields are grouped by the class that declares them, a
    nested section's fields by the section's GROUP. SET_ELSEWHERE fields are not listed (and `build`
    refuses them, saying why)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    listed = getattr(cls, "LISTED", None)
    out = []
    elsewhere = getattr(cls, "SET_ELSEWHERE", {})
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += options(tp, f"{prefix}{f.name}.", getattr(tp, "GROUP", f.name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        owner = _declared_in(cls, f.name)
        out.append(Option(prefix + f.name, tp, default, docs.get(f.name, ""),
                          group or getattr(owner, "GROUP", owner.__name__),
                          (listed is None or f.name in listed) and f.name not in elsewhere,
                          getattr(cls, "ALIASES", {}).get(f.name, {})))
    return out


def renamed(cls: type, prefix: str = "") -> dict[str, str]:
    """{old dotted key: dotted field} over cls and its nested recipe sections."""
    hints = typing.get_type_hints(cls)
    out = {prefix + old: prefix + new for old, new in getattr(cls, "RENAMED", {}).items()}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(renamed(hints[f.name], f"{prefix}{f.name}."))
    return out


def coerce(name: str, tp: Any, v: Any, where: str, aliases: dict[str, str] | None = None) -> Any:
    """A YAML value as the field's type where that is lossless; anything else is an error naming the key."""
    base = unwrap_optional(tp)
    if v is None:
        return v
    if aliases and isinstance(v, str):
        v = aliases.get(v, v)
    if base is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if base is float and isinstance(v, str):
        try:
            return float(v)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    if base in (int, float, str, bool) and not (isinstance(v, base) and not (base is int and isinstance(v, bool))):
        raise GptlabError(f"{where}: option {name} must be {base.__name__}, got {v!r}")
    if get_origin(base) is Literal and v not in get_args(base):
        raise GptlabError(f"{where}: option {name}={v!r} is not one of {list(get_args(base))}")
    return v


def build(cls: type, values: dict[str, Any], where: str = "recipe") -> Any:
    """Instantiate `cls` from a nested dict, refusing unknown keys (so a recipe cannot misspell an option)."""
    if not isinstance(values, dict):
        raise GptlabError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    moved = getattr(cls, "RENAMED", {})
    values = {moved.get(k, k): v for k, v in values.items()}
    elsewhere = getattr(cls, "SET_ELSEWHERE", {})
    for key in values:
        if key in elsewhere:
            raise GptlabError(f"{where}: {key} cannot be set here: {elsewhere[key]}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise GptlabError(f"{where}: unknown option(s) for {cls.__name__}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names - set(elsewhere)))})")
    aliases = getattr(cls, "ALIASES", {})
    kwargs = {}
    for k, v in values.items():
        tp = hints[k]
        kwargs[k] = (build(tp, v, f"{where}.{k}") if dataclasses.is_dataclass(tp)
                     else coerce(k, tp, v, where, aliases.get(k)))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise GptlabError(f"{where}: {e}") from None


def load_recipe(cls: type, path: str | Path | None, overrides: dict[str, Any] | None = None) -> Any:
    """A dataclass from an optional YAML recipe, then dotted overrides (`model.n_layer`) on top."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise GptlabError(f"recipe {p} does not exist")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise GptlabError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise GptlabError(f"recipe {p} must be a mapping of option: value, got {type(values).__name__}")
    for dotted, v in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return build(cls, values, str(path) if path else "options")
