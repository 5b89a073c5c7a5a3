"""The floor rule as a test: every module of the package imports only from its own floor or below.

Floors (docs: README "Package layout"; /work/shared/reference/house.md):
  1  device, cpu_compat, checkpointing, safe_loading, dataclass_utils, file_checks, parallel/, world/, kernels/
  2  data/, evaluation/ (scorers and benchmark loaders)
  3  models/, rewards/
  4  training/, inference/, conversion/
  5  rl/
  6  recipes/
  7  cli, train, api, demo/, slurm/, scaling/

scaling/ sits on the top floor: its sweeps plan recipes, launch trainers here or as a SLURM job array
and collect their runs, so it orchestrates everything below it (fit.py and report.py, pure math, would
fit on floor 1, but one package has one floor). Nothing but the CLI imports it.

Every import counts: module level, inside functions, `TYPE_CHECKING` blocks, relative imports and
`importlib.import_module("megatron_xomni...")`. The package root (`megatron_xomni/__init__.py`) is
floor 1 and imports only floor 1.

A second rule from issue 10: the built-in world is one data source, so only its own plugins import
`megatron_xomni.world` (WORLD_USERS); WORLD_ALLOWED lists what still does, for the lead to shrink.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_xomni"

FLOORS = {
    1: ["device", "cpu_compat", "checkpointing", "safe_loading", "dataclass_utils", "file_checks", "parallel",
        "world", "kernels", ""],  # "" = the package root itself
    2: ["data", "evaluation"],
    3: ["models", "rewards"],
    4: ["training", "inference", "conversion"],
    5: ["rl"],
    6: ["recipes"],
    7: ["cli", "train", "api", "demo", "slurm", "scaling"],
}
FLOOR_OF = {top: floor for floor, tops in FLOORS.items() for top in tops}

# Imports that break the rule, each with why it is still here: (importing module, imported module).
# Empty since evaluation/world_bench stopped importing rewards/; keep it empty.
ALLOWED: dict[tuple[str, str], str] = {
}


# The built-in world is one data source among others: only the world's own plugins may import it
# (the world corpus writer and world texts in data/, the world benchmark, the world reward).
WORLD_USERS = ("megatron_xomni.world", "megatron_xomni.data.world_source", "megatron_xomni.data.corpus",
               "megatron_xomni.data.text_tokenizer",
               "megatron_xomni.data.caption_batches", "megatron_xomni.evaluation.world_bench",
               "megatron_xomni.rewards.world_alignment")
# Modules that still read the world directly (empty since the data sources: keep it empty).
WORLD_ALLOWED: dict[str, str] = {
}


def _top(module: str) -> str:
    """'megatron_xomni.models.xomni.model' -> 'models'; 'megatron_xomni' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) for every megatron_xomni import in the file, wherever it sits."""
    name = _module_name(path, package)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "megatron_xomni":  # `from megatron_xomni import x`: x is the submodule used
                found += [(node.lineno, f"megatron_xomni.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, mod))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))  # importlib.import_module("megatron_xomni...")
    return [(line, m) for line, m in found if m == "megatron_xomni" or m.startswith("megatron_xomni.")]


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations() -> list[tuple[str, str, int, int, int]]:
    """(importer, imported, line, importer floor, imported floor) for every upward import."""
    out = []
    for path in _modules():
        me = _module_name(path)
        mine = FLOOR_OF[_top(me)]
        for line, mod in imports_of(path):
            theirs = FLOOR_OF.get(_top(mod))
            if theirs is None:
                raise AssertionError(f"{me}:{line} imports {mod}: its folder has no floor in FLOORS")
            if theirs > mine:
                out.append((me, mod, line, mine, theirs))
    return out


def test_every_module_has_a_floor():
    unknown = sorted({_top(_module_name(p)) for p in _modules()} - set(FLOOR_OF))
    assert not unknown, f"add these to FLOORS (and README): {unknown}"


def test_imports_only_point_down():
    bad = [f"{a}:{line} (floor {fa}) imports {b} (floor {fb})" for a, b, line, fa, fb in violations()
           if (a, b) not in ALLOWED]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_allowlist_has_no_stale_entries():
    """An entry whose import is gone must leave the list (so the list only ever shrinks)."""
    current = {(a, b) for a, b, *_ in violations()}
    stale = sorted(set(ALLOWED) - current)
    assert not stale, f"remove from ALLOWED (fixed): {stale}"


def world_importers() -> dict[str, list[int]]:
    """Modules outside WORLD_USERS that import megatron_xomni.world, with the lines."""
    out: dict[str, list[int]] = {}
    for path in _modules():
        me = _module_name(path)
        if me.startswith(WORLD_USERS):
            continue
        lines = [line for line, mod in imports_of(path) if mod == "megatron_xomni.world" or
                 mod.startswith("megatron_xomni.world.")]
        if lines:
            out[me] = lines
    return out


def test_only_world_plugins_import_the_world():
    bad = {m: lines for m, lines in world_importers().items() if m not in WORLD_ALLOWED}
    assert not bad, f"these import megatron_xomni.world (use a data source / prompt source): {bad}"
    stale = sorted(set(WORLD_ALLOWED) - set(world_importers()))
    assert not stale, f"remove from WORLD_ALLOWED (fixed): {stale}"


@pytest.mark.parametrize("src,expected", [
    ("import megatron_xomni.rl.grpo\n", [(1, "megatron_xomni.rl.grpo")]),
    ("def f():\n    from megatron_xomni.training.step import x\n", [(2, "megatron_xomni.training.step")]),
    ("from megatron_xomni import cli\n", [(1, "megatron_xomni.cli")]),
    ("from ..rl import grpo\n", [(1, "megatron_xomni.rl")]),
    ("import importlib\nimportlib.import_module('megatron_xomni.demo.cli')\n", [(2, "megatron_xomni.demo.cli")]),
    ("import torch\nfrom typing import TYPE_CHECKING\n", []),
])
def test_import_reader_sees_every_form(tmp_path, src, expected):
    """The reader itself: function-level, package-relative and importlib imports all count."""
    fake = tmp_path / "megatron_xomni" / "data" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(src)
    assert imports_of(fake, tmp_path / "megatron_xomni") == expected
