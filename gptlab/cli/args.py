"""A command's argument parser, built from its function's signature and docstring, so `--help` cannot drift.

Parameters without a default are positional; `bool` gives `--x/--no-x`; `Literal[...]` gives choices;
`list[T]` takes several values (a repeated option adds to them). A parameter typed as a recipe dataclass (TrainConfig, FinetuneConfig) takes
an optional YAML file as a positional argument and every field as `--field VALUE` (`--model.n-layer 4` for a
nested section), listed in groups (gptlab.recipe.options). Each option has one spelling, with dashes;
`normalise_argv` also accepts underscores and a recipe's earlier option names.
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from gptlab import recipe

HELP_POSITION = 32  # column where option help starts; shorter invocations keep their help on the same line


class Formatter(argparse.HelpFormatter):
    """Options with their help on one line where it fits; descriptions wrapped to the terminal, except
    indented lines (examples), which are kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=HELP_POSITION)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if lines and not any(line.startswith(" ") for line in lines):
                out.append(textwrap.fill(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                         subsequent_indent=indent))
            else:
                out.append("\n".join(indent + line for line in lines))
        return "\n\n".join(out)


def docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
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


def flag(name: str) -> str:
    """The one spelling of an option: --seq-len, --model.n-layer."""
    return "--" + name.replace("_", "-")


def _converter(tp: Any) -> Callable[[str], Any]:
    """A converter with a readable name, so argparse says "invalid int value: 'x'"."""
    tp = recipe.unwrap_optional(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):  # e.g. int | list[int]: the scalar
        tp = next(a for a in get_args(tp) if a in (int, float, str))
    return tp if tp in (int, float, str, Path) else str


_METAVARS = {int: "N", float: "X", str: "S", Path: "PATH"}


def _with_aliases(convert: Callable[[str], Any], aliases: dict[str, str]) -> Callable[[str], Any]:
    def convert_alias(text: str) -> Any:
        return convert(aliases.get(text, text))

    convert_alias.__name__ = getattr(convert, "__name__", "value")
    return convert_alias


def add_argument(parser, name: str, tp: Any, default: Any, help: str, positional: bool, recipe_field: bool = False,
                 listed: bool = True, aliases: dict[str, str] | None = None) -> None:
    """One parameter or recipe field as an argparse argument (recipe fields default to 'not given')."""
    tp = recipe.unwrap_optional(tp)
    origin = get_origin(tp)
    flags = [name] if positional else [flag(name)]
    if name == "out":
        flags.insert(0, "-o")  # `gptlab tokenizer train CORPUS -o DIR`, `gptlab prepare ... -o DATA`
    kw: dict[str, Any] = {"help": help or None}
    if not positional:
        kw["dest"] = name
        kw["default"] = argparse.SUPPRESS if recipe_field else default
        shown = default not in (None, "", [], False, 0) and default is not inspect.Parameter.empty
        if shown and help and "default" not in help:
            kw["help"] = f"{help} [{'on' if default is True else _show(default)}]"
    if not listed:
        kw["help"] = argparse.SUPPRESS
    if tp is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        return
    if origin is Literal:
        choices = list(get_args(tp))
        kw["choices"] = choices
        kw["type"] = _with_aliases(type(choices[0]), aliases or {})
        if len(",".join(map(str, choices))) > 16:  # a long list of choices goes into the help, not the invocation
            kw["metavar"] = "S"
            if kw["help"] not in (None, argparse.SUPPRESS) and str(choices[0]) not in kw["help"]:
                head, bracket, rest = kw["help"].partition(" [")
                kw["help"] = f"{head}: {'|'.join(map(str, choices))}{bracket}{rest}"
    elif origin in (list, tuple):
        kw["nargs"] = "+" if positional else "*"
        if not positional and (recipe_field or default is None):
            kw["action"] = "extend"  # `--lora a=X --lora b=Y` and `--lora a=X b=Y` both give both
        kw["type"] = _converter(get_args(tp)[0]) if get_args(tp) else str
        kw["metavar"] = name.upper() if positional else _METAVARS.get(kw["type"], "S")
    else:
        kw["type"] = _converter(tp)
        if not positional:
            kw["metavar"] = _METAVARS.get(kw["type"], "S")
    if positional and default is not inspect.Parameter.empty:
        kw["nargs"] = "?"
        kw["default"] = default
    parser.add_argument(*flags, **kw)


def _show(default: Any) -> str:
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


def add_command(sub: argparse._SubParsersAction, name: str, fn: Callable[..., Any], prog: str) -> None:
    """A subcommand for `fn`, with its recipe's fields in groups when it takes one. `[x]` in a help line is
    the option's default."""
    desc, helps = docstring(fn)
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    usage = None
    takes_recipe = any(recipe.is_recipe(hints.get(p)) for p in params)
    if takes_recipe or len(params) > 8:  # too many options to list in the usage line
        words = [p.upper() for p, v in params.items() if v.default is inspect.Parameter.empty
                 and not recipe.is_recipe(hints.get(p))]
        usage = " ".join([prog, name, *words, *(["[RECIPE.yaml]"] if takes_recipe else []), "[--option VALUE ...]"])
    parser = sub.add_parser(name, help=desc.splitlines()[0] if desc else None, description=desc,
                            formatter_class=Formatter, usage=usage,
                            epilog="[x] after a help line is the option's default.")
    parser.set_defaults(_fn=fn)
    heading = {p: g for g, names in getattr(fn, "option_groups", {}).items() for p in names}
    sections = {g: parser.add_argument_group(g) for g in dict.fromkeys(heading.values())}
    for pname, param in params.items():
        tp = hints.get(pname, str)
        if recipe.is_recipe(tp):
            parser.add_argument("recipe", nargs="?", default=None, metavar="RECIPE.yaml",
                                help=f"YAML file of {tp.__name__} fields")
            groups: dict[str, argparse._ArgumentGroup] = {}
            for opt in recipe.options(tp):
                if opt.group not in groups:
                    groups[opt.group] = parser.add_argument_group(opt.group)
                add_argument(groups[opt.group], opt.name, opt.type, opt.default, opt.help, positional=False,
                             recipe_field=True, listed=opt.listed, aliases=opt.aliases)
            parser.set_defaults(_recipe=(pname, tp))
            continue
        positional = param.default is inspect.Parameter.empty
        where = sections[heading[pname]] if pname in heading else parser
        add_argument(where, pname, tp, param.default, helps.get(pname, ""), positional,
                     aliases=getattr(fn, "value_aliases", {}).get(pname))


def normalise_argv(argv: list[str], renamed: dict[str, str]) -> list[str]:
    """--a_b -> --a-b (one listed spelling, both accepted), and a recipe's earlier option names -> today's
    (--max-len -> --seq-len). Values and everything after a bare `--` are left as they are."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            name = name.replace("_", "-")
            name = renamed.get(name, name)
            arg = f"--{name}{eq}{value}"
        out.append(arg)
    return out
