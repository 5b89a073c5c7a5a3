"""Find and build recipes: Python functions in the top-level `recipes/` folder.

A recipe module registers functions with `@recipe`; `load_recipe("tiny_pt", ["optim.lr=1e-3"])`
builds the RunConfig and applies overrides. The folder is found next to the package (source
checkouts) or through $XOMNI_RECIPES_DIR.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from megatron_xomni.config import RunConfig, apply_overrides

_REGISTRY: dict[str, Callable[[], RunConfig]] = {}


def recipe(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
    """Register a recipe function under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def recipes_dir() -> Path:
    env = os.environ.get("XOMNI_RECIPES_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "recipes"


def _load_all() -> None:
    folder = recipes_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"recipes folder {folder} not found: set XOMNI_RECIPES_DIR")
    for path in sorted(folder.glob("*.py")):
        name = f"xomni_recipes_{path.stem}"
        if name in __import__("sys").modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        __import__("sys").modules[name] = module
        spec.loader.exec_module(module)


def available_recipes() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def load_recipe(name: str, overrides: list[str] | None = None) -> RunConfig:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    cfg = _REGISTRY[name]()
    return apply_overrides(cfg, list(overrides or []))
