"""`gptlab <command>`: the outermost layer. It imports the library; nothing in the library imports it.

Each command is a plain typed function registered with `@command` in one module per command group (the
modules below); its parser comes from its signature and docstring (gptlab/cli/args.py), so `--help` cannot
drift from the code. Bad input raises GptlabError, printed as one `error: ...` line with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Callable
from typing import Any

from gptlab.errors import GptlabError

# the command modules, in `gptlab --help` order
COMMAND_MODULES = ["generate", "info", "data", "train", "eval", "chat", "serve", "export", "scale", "compare", "synth"]

COMMANDS: dict[str, Callable[..., Any]] = {}


def command(name: str, aliases: dict[str, dict[str, str]] | None = None,
            groups: dict[str, tuple[str, ...]] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as `gptlab NAME` (a name with a space, like "tokenizer train", nests).

    aliases: {parameter: {other value: value}}, other names a choice is accepted under (not listed in --help).
    groups: {heading: parameters} for --help; parameters in none are listed under "options".
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.value_aliases = aliases or {}
        fn.option_groups = groups or {}
        COMMANDS[name] = fn
        return fn

    return register


def _load_commands() -> None:
    for module in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def build_parser() -> argparse.ArgumentParser:
    from gptlab import __version__
    from gptlab.cli.args import add_command

    _load_commands()
    parser = argparse.ArgumentParser(prog="gptlab", description="gptlab: build, train, fine-tune, evaluate and "
                                     "serve GPT-family language models.")
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, fn in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(title=f"{group} commands", metavar="COMMAND")
                gp.set_defaults(_group_parser=gp)
            add_command(groups[group], leaf, fn, prog=f"gptlab {group}")
        else:
            add_command(sub, name, fn, prog="gptlab")
    return parser


def _recipe_of(argv: list[str]) -> type | None:
    """The recipe class the command named in argv takes, if any (for its earlier option names)."""
    from gptlab import recipe

    words = [a for a in argv[:2] if not a.startswith("-")]
    for name in (" ".join(words[:2]), words[0] if words else ""):
        fn = COMMANDS.get(name)
        if fn is not None:
            return next((tp for tp in typing.get_type_hints(fn).values() if recipe.is_recipe(tp)), None)
    return None


def main(argv: list[str] | None = None) -> int:
    from gptlab import recipe
    from gptlab.cli.args import normalise_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cls = _recipe_of(argv)
    renamed = {old.replace("_", "-"): new.replace("_", "-") for old, new in recipe.renamed(cls).items()} if cls else {}
    args = vars(parser.parse_args(normalise_argv(argv, renamed)))
    fn = args.pop("_fn", None)
    if fn is None:
        (args.get("_group_parser") or parser).print_help()
        return 2
    args.pop("_group_parser", None)
    spec = args.pop("_recipe", None)
    try:
        if spec is not None:
            pname, cls = spec
            path = args.pop("recipe")
            fields = {o.name for o in recipe.options(cls)}
            overrides = {k: args.pop(k) for k in list(args) if k in fields}
            args[pname] = recipe.load_recipe(cls, path, overrides)
        result = fn(**args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no (a read-only or missing place, a full disk): say where, once
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0
