"""Prompt sources: one interface over every place prompts come from, addressed by index.

A `PromptSource` returns rows ``{"id": str, "prompt": str, ...}`` for any index ``i >= 0``. The
extra fields are what rewards read (``megatron_xomni.rewards``): the world reward's ``include``
(the world detector's request list), the OCR reward's ``text``, a benchmark's own fields.

Sources (chosen by `PromptConfig`):

* ``source="world"``: the built-in world's prompt streams (``split="train"`` for RL, ``"heldout"``
  for evaluation's disjoint stream), endless; row i is world sample i (``data/world_source.py``).
* a ``.txt`` file: one prompt per line (blank lines skipped); the id is the line number.
* a ``.jsonl`` file: one object per line with a non-empty ``"prompt"``, an optional ``"id"`` and any
  reward fields, e.g. ``{"prompt": "two red circles", "include": [{"shape": "circle", "count": 2,
  "color": "red"}], "text": null}`` or ``{"prompt": 'a sign that says "OPEN"', "text": "OPEN"}``.
  ``null`` says a reward does not apply to the row; a missing key is a failure of every reward that
  needs it (counted by ``RewardEnsemble``).
* ``format="geneval" | "dpg_bench" | "longtext_bench"``: a benchmark's published prompt file or
  folder (``evaluation/benchmarks.py`` loaders). GenEval's own requests are kept as
  ``geneval_include`` / ``geneval_exclude``: they name COCO classes, which the world detector does
  not know, so they must not pass for its ``include``. LongText rows carry ``text`` and ``lang``.

Indexing is deterministic: a file of n rows is read in passes (epoch = i // n); with ``shuffle``
each pass is its own permutation seeded by (seed, epoch), so GRPO, which asks for rows by global
index (step * prompts_per_step + ...), resumes at exactly the same prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = ("auto", "txt", "jsonl", "geneval", "dpg_bench", "longtext_bench")
BENCHMARKS = ("geneval", "dpg_bench", "longtext_bench")
SPLITS = ("train", "heldout")


@dataclass
class PromptConfig:
    """Where prompts come from (GRPO's `prompts` section)."""

    source: str = "world"
    """"world" (the built-in world's prompt streams) or a path: a .txt / .jsonl prompt file, or a
    benchmark's published prompt file or folder (with `format`)."""
    format: str = "auto"
    """auto (world, or from the file suffix .txt / .jsonl), txt, jsonl, geneval, dpg_bench, longtext_bench."""
    split: str = "train"
    """World only (ignored for files): "train" (the training stream) or "heldout" (evaluation's disjoint stream)."""
    skills: list = field(default_factory=list)
    """World only (ignored for files, so a world recipe runs on a file by setting `source` alone): skills that
    row i cycles through (skills[i % len(skills)]); empty: all skills."""
    seed: int = 777
    """World: the stream's seed. Files: the seed of each pass's shuffled order."""
    shuffle: bool = True
    """Files only: read each pass over the file in its own seeded order (False: file order)."""

    @property
    def is_world(self) -> bool:
        return self.source == "world" and self.format == "auto"

    def validate(self) -> None:
        """Types and choices (what a dry run checks); the file itself is read by `make_prompt_source`."""
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError('prompts.source must be "world" or the path of a prompt file')
        if self.format not in FORMATS:
            raise ValueError(f"prompts.format={self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.split not in SPLITS:
            raise ValueError(f"prompts.split={self.split!r}: choose one of {', '.join(SPLITS)}")
        if not isinstance(self.skills, list) or not all(isinstance(s, str) for s in self.skills):
            raise ValueError(f'prompts.skills={self.skills!r} must be a list of skill names, e.g. ["counting"]')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"prompts.seed={self.seed!r} must be an integer")
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"prompts.shuffle={self.shuffle!r} must be true or false")
        if self.is_world:
            from megatron_xomni.data.world_source import check_world_skills

            check_world_skills(self.skills, "prompts.skills")
            return
        if self.format == "auto" and Path(self.source).suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"prompts.source={self.source}: cannot tell the format from the suffix; use a .txt or "
                             f".jsonl file or set prompts.format to one of {', '.join(BENCHMARKS)}")


class PromptSource:
    """Rows by index. Subclasses set `name` and `num_rows` (None: endless) and implement `_row`."""

    name: str = "prompts"
    num_rows: Optional[int] = None

    def _row(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"prompt index must be a non-negative integer, got {index!r}")
        return self._row(int(index))

    def rows(self, indices) -> list[dict]:
        return [self[i] for i in indices]

    def fields(self) -> set[str]:
        """Fields that at least one row gives a value for (not None, "" or [])."""
        raise NotImplementedError


def has_value(value) -> bool:
    """A field "gives a value" unless it is None or an empty string / list / dict."""
    return value is not None and not (isinstance(value, (str, list, dict)) and len(value) == 0)


class FilePromptSource(PromptSource):
    """A finite list of rows read in passes, each pass in its own seeded order (or file order)."""

    def __init__(self, rows: list[dict], name: str, seed: int = 777, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError(f"{name} holds no prompts")
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{name}: id {dup!r} appears more than once; ids must be unique")
        self._rows, self.name, self.num_rows = rows, name, len(rows)
        self.seed, self.shuffle = seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
        return self._perm[1]

    def position(self, index: int) -> int:
        """Which row of the file global index `index` reads."""
        epoch, k = divmod(index, self.num_rows)
        return int(self._order(epoch)[k]) if self.shuffle else k

    def _row(self, index: int) -> dict:
        return dict(self._rows[self.position(index)])

    def fields(self) -> set[str]:
        return {k for r in self._rows for k, v in r.items() if has_value(v)}


def _prompt_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'{where}: expected a non-empty string "prompt", got {value!r:.60}')
    return value.strip()


def read_txt_prompts(path: Path) -> list[dict]:
    """One prompt per line (blank lines skipped); ids are line numbers."""
    from megatron_xomni.file_checks import require_file

    require_file(path, "prompt file", "expected a .txt file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} is not UTF-8 text") from None
    return [{"id": str(n), "prompt": line.strip()} for n, line in enumerate(lines, 1) if line.strip()]


def read_jsonl_prompts(path: Path) -> list[dict]:
    """{"prompt": ..., optional "id", reward fields...} per line; ids default to line numbers."""
    from megatron_xomni.evaluation.benchmarks import read_jsonl

    rows = []
    for lineno, obj in read_jsonl(path, '{"prompt": ...} per line'):
        row = {**obj, "prompt": _prompt_text(obj.get("prompt"), f"{path}:{lineno}")}
        ident = obj.get("id", lineno)
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise ValueError(f"{path}:{lineno}: id must be a string or an integer, got {ident!r:.60}")
        row["id"] = str(ident)
        rows.append(row)
    return rows


def read_benchmark_prompts(name: str, path: Path) -> list[dict]:
    """A benchmark's prompts as rows (see the module docstring for GenEval's renamed fields)."""
    from megatron_xomni.evaluation.benchmarks import load_benchmark

    rename = {"include": "geneval_include", "exclude": "geneval_exclude"} if name == "geneval" else {}
    return [{"id": p.id, "prompt": p.prompt, **{rename.get(k, k): v for k, v in p.meta.items()}}
            for p in load_benchmark(name, path)]


def make_prompt_source(cfg: PromptConfig, height: int = 64, width: int = 64) -> PromptSource:
    """The source `cfg` names (files are read and checked here). `height`/`width`: the image size
    world prompts are drawn for (the world lays scenes out for a size, so captions depend on it)."""
    cfg.validate()
    if cfg.is_world:
        from megatron_xomni.data.world_source import WorldPromptSource

        return WorldPromptSource(cfg.split, cfg.seed, cfg.skills, height, width)
    path = Path(cfg.source)
    fmt = cfg.format if cfg.format != "auto" else path.suffix.lower().lstrip(".")
    if fmt == "txt":
        rows = read_txt_prompts(path)
    elif fmt == "jsonl":
        rows = read_jsonl_prompts(path)
    else:
        rows = read_benchmark_prompts(fmt, path)
    return FilePromptSource(rows, str(path), cfg.seed, cfg.shuffle)


def check_fields(source: PromptSource, needs: dict[str, tuple[str, ...]]) -> None:
    """Refuse, in one line, a source in which no row has a field a configured reward needs
    (`needs`: reward name -> the fields it reads)."""
    have = source.fields()
    for reward, wanted in needs.items():
        for name in wanted:
            if name not in have:
                raise ValueError(f"prompt source {source.name}: no row has a value for the {name!r} field, which reward {reward!r} "
                                 f"reads; add {name!r} to the rows that need it or drop {reward!r} from the rewards")
