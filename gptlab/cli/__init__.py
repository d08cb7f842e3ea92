"""`gptlab <command>`: each command is a plain typed function registered with `@command`.

The argument parser is built from the function's signature and docstring, so `--help` cannot drift from
the code. Parameters without a default are positional; `bool` gives `--x/--no-x`; `Literal[...]` gives
choices; `list[T]` takes several values. A parameter typed as a dataclass (a recipe, e.g. TrainConfig)
takes an optional YAML file as its positional argument and every field as `--field=value`
(`--model.n_layer=4` for a nested dataclass); unknown YAML keys are errors.

Bad input raises GptlabError, printed as one `error: ...` line with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

from gptlab.errors import GptlabError

# modules whose import registers commands, in `gptlab --help` order
COMMAND_MODULES = [
    "gptlab.generate",
    "gptlab.info",
    "gptlab.tokenizer_cli",
    "gptlab.data",
    "gptlab.train",
    "gptlab.finetune",
    "gptlab.eval",
    "gptlab.chat",
]

COMMANDS: dict[str, Callable[..., Any]] = {}


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as `gptlab NAME` (a name with a space, like "tokenizer train", nests)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------------------
# docstrings -> help


def _doc(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(description, {arg: help}) from a Google-style docstring with an `Args:` section."""
    doc = inspect.getdoc(fn) or ""
    head, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in args.splitlines():
        m = re.match(r"\s{0,8}(\w[\w.]*):\s*(.*)", line)
        if m and not line.startswith(" " * 9):
            current = m.group(1)
            helps[current] = m.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return head.strip(), helps


def field_helps(cls: type) -> dict[str, str]:
    """Help for dataclass fields from `#` comments after them in the source (a subclass's own comments
    win over its bases'), else from an Args: section."""
    helps = _doc(cls)[1]
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


# ---------------------------------------------------------------------------------------------------------
# types -> argparse


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _scalar(tp: Any) -> Callable[[str], Any]:
    """A converter with a readable name, so argparse says "invalid int value: 'x'"."""
    tp = _unwrap_optional(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | list[int]: take the first scalar
        tp = next(a for a in get_args(tp) if a in (int, float, str))
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    return str


def _add_argument(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, help: str,
                  positional: bool, suppress: bool = False) -> None:
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    flags = [name] if positional else list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))
    if name == "out":
        flags.insert(0, "-o")  # `gptlab tokenizer train CORPUS -o DIR`, `gptlab prepare ... -o DATA`
    kw: dict[str, Any] = {"help": help or None}
    if not positional:
        kw["dest"] = name
        kw["default"] = argparse.SUPPRESS if suppress else default
        if default not in (None, dataclasses.MISSING) and help is not None and "default" not in (help or ""):
            kw["help"] = f"{help} (default: {default})" if help else f"(default: {default})"
    if tp is bool:
        kw.pop("type", None)
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        return
    if origin is Literal:
        kw["choices"] = list(get_args(tp))
        kw["type"] = type(get_args(tp)[0])
    elif origin in (list, tuple):
        kw["nargs"] = "*" if not positional else "+"
        kw["type"] = _scalar(get_args(tp)[0]) if get_args(tp) else str
    else:
        kw["type"] = _scalar(tp)
    if positional and default is not inspect.Parameter.empty:
        kw["nargs"] = "?"
        kw["default"] = default
    parser.add_argument(*flags, **kw)


def _dataclass_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, help) for each field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    helps = field_helps(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _dataclass_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((prefix + f.name, tp, default, helps.get(f.name, "")))
    return out


def build_dataclass(cls: type, values: dict[str, Any], where: str = "recipe") -> Any:
    """Instantiate `cls` from a nested dict, refusing unknown keys (so a recipe cannot misspell an option)."""
    if not isinstance(values, dict):
        raise GptlabError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise GptlabError(f"{where}: unknown option(s) for {cls.__name__}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in values.items():
        tp = hints[k]
        kwargs[k] = build_dataclass(tp, v, f"{where}.{k}") if dataclasses.is_dataclass(tp) else _check(k, tp, v, where)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise GptlabError(f"{where}: {e}") from None


def _check(name: str, tp: Any, v: Any, where: str) -> Any:
    """Coerce a YAML value to the field's type where that is lossless; refuse otherwise."""
    base = _unwrap_optional(tp)
    if v is None:
        return v
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


def load_recipe(cls: type, path: str | Path | None, overrides: dict[str, Any]) -> Any:
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
    for dotted, v in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return build_dataclass(cls, values, str(path) if path else "options")


# ---------------------------------------------------------------------------------------------------------
# parser


def _add_command(sub: argparse._SubParsersAction, name: str, fn: Callable[..., Any]) -> None:
    desc, helps = _doc(fn)
    parser = sub.add_parser(name, help=desc.splitlines()[0] if desc else None, description=desc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(_fn=fn)
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        tp = hints.get(pname, str)
        if dataclasses.is_dataclass(tp):
            parser.add_argument("recipe", nargs="?", default=None, help=f"YAML recipe with {tp.__name__} fields")
            for dotted, ftp, default, fhelp in _dataclass_fields(tp):
                _add_argument(parser, dotted, ftp, default, fhelp, positional=False, suppress=True)
            parser.set_defaults(_recipe=(pname, tp))
            continue
        positional = param.default is inspect.Parameter.empty
        _add_argument(parser, pname, tp, param.default, helps.get(pname, ""), positional)


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a module that exists but fails to import is a real bug
                raise
    parser = argparse.ArgumentParser(prog="gptlab", description="gptlab: build, train, fine-tune, evaluate and "
                                     "serve GPT-family language models.")
    parser.add_argument("--version", action="version", version=f"gptlab {_version()}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, fn in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(title=f"{group} commands", metavar="COMMAND")
                gp.set_defaults(_group_parser=gp)
            _add_command(groups[group], leaf, fn)
        else:
            _add_command(sub, name, fn)
    return parser


def _version() -> str:
    from gptlab import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn", None)
    if fn is None:
        (args.get("_group_parser") or parser).print_help()
        return 2
    args.pop("_group_parser", None)
    recipe = args.pop("_recipe", None)
    try:
        if recipe is not None:
            pname, cls = recipe
            path = args.pop("recipe")
            overrides = {k: args.pop(k) for k in list(args) if "." in k or k in {f.name for f in dataclasses.fields(cls)}}
            args[pname] = load_recipe(cls, path, overrides)
        result = fn(**args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    # run through the imported module, where the commands register (not this __main__ copy)
    from gptlab.cli import main as _main

    sys.exit(_main())
