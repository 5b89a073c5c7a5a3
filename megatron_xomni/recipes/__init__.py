"""The recipe registry: recipes are Python functions in this package that return a typed config.

A recipe module registers functions with `@recipe`; `load_recipe("tiny_pt", ["optim.lr=1e-3"])`
builds the config and applies `key=value` overrides. Every module of this package is a recipe
module (`tiny`, `xomni_7b`, `grpo`, ...); they are imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from megatron_xomni.dataclass_utils import apply_overrides

_REGISTRY: dict[str, Callable] = {}


def recipe(fn: Callable) -> Callable:
    """Register a recipe function under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_recipes() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def load_recipe(name: str, overrides: list[str] | None = None):
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    cfg = _REGISTRY[name]()
    return apply_overrides(cfg, list(overrides or []))
