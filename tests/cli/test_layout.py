"""The package's shape, read from its own import statements: the CLI is the outermost layer, no two modules
import each other in a circle, no file holds two jobs' worth of lines, and model families are data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "gptlab"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


def _imports(path: Path) -> set[str]:
    """gptlab modules `path` imports anywhere in it (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c too when c is a module
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import a.b.c` runs a and a.b too; keep the deepest module
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_the_walk_sees_the_package():
    assert {"gptlab.cli", "gptlab.formats.hf", "gptlab.models.model", "gptlab.train.loop"} <= set(MODULES)
    assert "gptlab.models.model" in GRAPH["gptlab.formats.hf"]  # an edge we know is there


def test_no_library_module_imports_the_cli():
    offenders = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
                       if (dep == "gptlab.cli" or dep.startswith("gptlab.cli."))
                       and not (name == "gptlab.cli" or name.startswith("gptlab.cli.") or name == "gptlab.__main__"))
    assert not offenders, offenders


def test_importing_the_library_does_not_load_the_cli():
    library = sorted(n for n in MODULES if not n.startswith("gptlab.cli") and n != "gptlab.__main__")
    code = (f"import importlib, sys\nfor m in {library!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'gptlab.cli' or m.startswith('gptlab.cli.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other_in_a_circle():
    # edges into a package's __init__ are left out: importing gptlab.x.y runs gptlab/x/__init__.py anyway
    graph = {name: {d for d in deps if d not in PACKAGES} for name, deps in GRAPH.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_600_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines: it probably holds two jobs"


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_model_families_are_named_only_in_their_own_modules():
    """A family's model_type appears in code only in its formats/families module and the presets: nothing
    else chooses behaviour by family name (Config's and the default run's default family aside)."""
    from gptlab.formats import families

    types = set(families.model_types())
    allowed = {PKG / "models" / "config.py": {"gpt2"}, PKG / "train" / "pretrain.py": {"gpt2"},
               # the scaling study's default recipe: Qwen3's layout, saved under its model_type
               PKG / "scale" / "sweep.py": {"qwen3"},
               PKG / "models" / "presets.py": types,
               # llama.cpp's tokenizer names (tokenizer.ggml.model "gpt2" = byte-level BPE; pre-tokenizer "qwen2"),
               # chosen from the tokenizer's JSON, not from the model's family
               PKG / "formats" / "gguf_export.py": {"gpt2", "qwen2"}}
    found = {}
    for path in MODULES.values():
        if path.parent == PKG / "formats" / "families":
            continue
        named = (_string_constants(path) & types) - allowed.get(path, set())
        if named:
            found[str(path.relative_to(ROOT))] = sorted(named)
    assert not found, found


def test_every_family_module_is_registered():
    """Adding a family is adding a module: the registry finds every module in formats/families/."""
    from gptlab.formats import families

    types = families.model_types()  # imports every family module
    modules = [sys.modules[f"gptlab.formats.families.{p.stem}"]
               for p in sorted((PKG / "formats" / "families").glob("*.py")) if p.stem != "__init__"]
    assert all(getattr(m, "FAMILIES", None) for m in modules)
    assert sorted(f.model_type for m in modules for f in m.FAMILIES) == types
