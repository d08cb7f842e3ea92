"""The registry of model families: every module in this folder that defines `FAMILIES` (a list of
`gptlab.formats.family.Family`) is found here, so adding a family is adding one module (and its presets).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from gptlab.errors import GptlabError
from gptlab.formats.family import Family


@functools.cache
def registry() -> dict[str, Family]:
    """{model_type: Family} over every module of this package, in module-name order."""
    out: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for family in getattr(module, "FAMILIES", ()):
            if family.model_type in out:
                raise RuntimeError(f"model_type {family.model_type!r} is declared twice (again in {module.__name__})")
            out[family.model_type] = family
    return out


def model_types() -> list[str]:
    return sorted(registry())


def get(model_type: str | None, where: str = "config.json") -> Family:
    """The family of `model_type`, or one error (naming `where` the model_type came from) listing the
    supported ones."""
    families = registry()
    if model_type not in families:
        raise GptlabError(f"{where} model_type={model_type!r} is not supported (supported: {', '.join(sorted(families))})")
    return families[model_type]
