"""Loaders for the paper's generation benchmarks from local copies, into one ``BenchmarkPrompt`` list.

Formats read (as published):

* GenEval (github.com/djghosh13/geneval, ``prompts/evaluation_metadata.jsonl``): one JSON object
  per line with ``tag`` (task: single_object, two_object, counting, colors, position,
  color_attr), ``include`` (list of ``{"class", "count", "color"?, "position"?}``), optional
  ``exclude``, and ``prompt``. GenEval names output folders by the 0-based line index, zero
  padded to 5 digits, so that is the id.
* DPG-Bench (ELLA repo, ``dpg_bench/``): a ``prompts/`` folder of ``<item_id>.txt`` files (the
  prompt text) and/or ``dpg_bench.csv`` with columns ``item_id, text, keywords, proposition_id,
  dependency, category_broad, category_detailed, tuple, question_natural_language`` - one row
  per yes/no question, several rows per prompt. ``dependency`` lists parent proposition ids
  (``0`` = none). Questions go to ``meta["questions"]``.
* LongText-Bench (X-Omni repo ``textbench/``, also on the Hub as ``X-Omni/LongText-Bench``):
  ``text_prompts.jsonl`` (English) and ``text_prompts_zh.jsonl`` (Chinese), one JSON object per
  line with ``prompt_id`` (e.g. ``"0000"``), ``prompt`` and ``text`` (the words to render: a
  string or list of strings), plus optional fields such as ``category`` / ``length``, which are
  kept in ``meta``. ``meta["text"]`` is the space-joined ground truth, ``meta["lang"]`` the
  language. A JSON array of the same objects is accepted too.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from megatron_xomni.evaluation.longtext import detect_lang
from megatron_xomni.file_checks import require_file


@dataclass(frozen=True)
class BenchmarkPrompt:
    """One benchmark prompt."""

    # Identifier used to name generated images (benchmark-specific, see the module docstring).
    id: str
    # The text-to-image prompt.
    prompt: str
    # Everything else the benchmark's scorer needs (GenEval include/exclude, DPG questions, text).
    meta: dict[str, Any] = field(default_factory=dict)


def _binary(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is binary, not UTF-8 text; expected {what}")


def _read_text(path: Path, what: str) -> str:
    try:
        return require_file(path, "prompt file", f"expected {what}", allow_empty=True).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _binary(path, what) from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    rows = []
    require_file(path, "prompt file", f"expected {what}", allow_empty=True)
    with path.open(encoding="utf-8") as f:
        lines = enumerate(f, 1)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                break
            except UnicodeDecodeError:
                raise _binary(path, what) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}); expected {what}") from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object per line for {what}, got {type(obj).__name__}"
                )
            rows.append((lineno, obj))
    if not rows:
        raise ValueError(f"{path} is empty; expected {what}")
    return rows


def _require(path: Path, lineno: int | str, obj: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}:{lineno}: missing field(s) {', '.join(missing)} for {what}")


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}")
    return path


# --------------------------------------------------------------------------------------------- GenEval
def load_geneval(path: str | Path) -> list[BenchmarkPrompt]:
    """GenEval prompts from ``evaluation_metadata.jsonl`` (or a folder containing it)."""
    path = _existing(path, "GenEval evaluation_metadata.jsonl")
    if path.is_dir():
        path = _existing(path / "evaluation_metadata.jsonl", "GenEval evaluation_metadata.jsonl")
    what = "GenEval metadata (tag, include, prompt)"
    prompts = []
    for index, (lineno, obj) in enumerate(read_jsonl(path, what)):
        _require(path, lineno, obj, ("tag", "include", "prompt"), what)
        if not isinstance(obj["include"], list):
            kind = type(obj["include"]).__name__
            raise ValueError(f"{path}:{lineno}: 'include' must be a list of objects, got {kind}")
        meta = {k: v for k, v in obj.items() if k != "prompt"}
        prompts.append(BenchmarkPrompt(id=f"{index:05d}", prompt=str(obj["prompt"]), meta=meta))
    return prompts


# ------------------------------------------------------------------------------------------- DPG-Bench
def _parse_dependency(value: str, where: str) -> list[int]:
    try:
        return [int(x) for x in str(value).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ValueError(f"{where}: dependency {value!r} is not a comma-separated list of integers") from None


def load_dpg_bench(path: str | Path) -> list[BenchmarkPrompt]:
    """DPG-Bench prompts from a ``dpg_bench`` folder (``prompts/*.txt`` and/or ``dpg_bench.csv``)
    or the CSV path itself. ``meta["questions"]`` holds the scoring questions when the CSV exists."""
    path = _existing(path, "DPG-Bench folder or dpg_bench.csv")
    csv_path = path if path.is_file() else path / "dpg_bench.csv"
    prompt_dir = None if path.is_file() else path / "prompts"
    have_csv = csv_path.is_file()
    have_prompts = prompt_dir is not None and prompt_dir.is_dir()
    if not have_csv and not have_prompts:
        raise FileNotFoundError(f"{path} has neither prompts/ nor dpg_bench.csv; point at the ELLA dpg_bench folder")

    texts: dict[str, str] = {}
    questions: dict[str, list[dict]] = {}
    extra: dict[str, dict] = {}
    if have_csv:
        try:
            _read_csv(csv_path, texts, questions, extra)
        except UnicodeDecodeError:
            raise _binary(csv_path, "the DPG-Bench CSV") from None
        if not texts:
            raise ValueError(f"{csv_path} has no rows; expected the DPG-Bench CSV")
    order = list(texts)
    if have_prompts:
        files = sorted(prompt_dir.glob("*.txt"))
        if not files and not have_csv:
            raise ValueError(f"{prompt_dir} holds no <item_id>.txt files")
        for file in files:
            text = _read_text(file, "the prompt text").strip()
            if not text:
                raise ValueError(f"{file} is empty; expected the prompt text")
            if file.stem not in texts:
                order.append(file.stem)
            # The .txt files are what generation scripts read, so they win over the CSV copy.
            texts[file.stem] = text
    return [
        BenchmarkPrompt(id=item, prompt=texts[item].strip(),
                        meta={"questions": questions.get(item, []), **extra.get(item, {})})
        for item in order
    ]


def _read_csv(csv_path: Path, texts: dict, questions: dict, extra: dict) -> None:
    """Rows of the DPG-Bench CSV into texts / questions / extra (by item_id)."""
    require_file(csv_path, "prompt file", "expected the DPG-Bench CSV")
    with csv_path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        missing = {"item_id", "text"} - fields
        if missing:
            cols = ", ".join(sorted(missing))
            raise ValueError(f"{csv_path}: missing column(s) {cols}; expected the DPG-Bench CSV")
        for lineno, row in enumerate(reader, 2):
            item = (row["item_id"] or "").strip()
            if not item:
                raise ValueError(f"{csv_path}:{lineno}: empty item_id")
            texts.setdefault(item, row["text"])
            extra.setdefault(item, {"keywords": row.get("keywords") or ""})
            q = questions.setdefault(item, [])
            if row.get("question_natural_language"):
                where = f"{csv_path}:{lineno}"
                raw_pid = row.get("proposition_id") or ""
                try:
                    pid = int(raw_pid)
                except ValueError:
                    raise ValueError(f"{where}: proposition_id {raw_pid!r} is not an integer") from None
                q.append({
                    "proposition_id": pid,
                    "question": row["question_natural_language"],
                    "dependency": _parse_dependency(row.get("dependency") or "0", where),
                    "tuple": row.get("tuple") or "",
                    "category_broad": row.get("category_broad") or "",
                    "category_detailed": row.get("category_detailed") or "",
                })


# -------------------------------------------------------------------------------------- LongText-Bench
_LONGTEXT_FILES = {"en": "text_prompts.jsonl", "zh": "text_prompts_zh.jsonl"}


def _read_longtext_file(path: Path, lang: str | None, id_prefix: str) -> list[BenchmarkPrompt]:
    what = "LongText-Bench prompts (prompt_id, prompt, text)"
    if path.suffix == ".json":
        try:
            data = json.loads(_read_text(path, what))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON ({exc.msg}); expected {what}") from None
        if not isinstance(data, list) or not data or not all(isinstance(o, dict) for o in data):
            raise ValueError(f"{path}: expected a non-empty JSON array of objects for {what}")
        rows = [(f"item {i}", o) for i, o in enumerate(data)]
    else:
        rows = read_jsonl(path, what)
    if lang is None and path.name.endswith("_zh" + path.suffix):
        lang = "zh"
    prompts = []
    for lineno, obj in rows:
        _require(path, lineno, obj, ("prompt_id", "prompt", "text"), what)
        text = obj["text"]
        if isinstance(text, list):
            text = " ".join(str(t) for t in text)
        elif not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'text' must be a string or list of strings, got {type(text).__name__}")
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "text")}
        meta["text"] = text
        meta["lang"] = lang or detect_lang(text)
        pid = str(obj["prompt_id"])
        prompts.append(BenchmarkPrompt(id=id_prefix + pid, prompt=str(obj["prompt"]), meta=meta))
    return prompts


def load_longtext_bench(path: str | Path, lang: Literal["en", "zh"] | None = None) -> list[BenchmarkPrompt]:
    """LongText-Bench prompts from a prompt file, or from a folder with ``text_prompts.jsonl`` /
    ``text_prompts_zh.jsonl``. From a folder with ``lang=None`` both languages are loaded and ids
    become ``"en/<prompt_id>"`` / ``"zh/<prompt_id>"`` (the two files reuse prompt ids);
    otherwise the id is the prompt_id. ``meta["prompt_id"]`` always holds the raw prompt_id."""
    if lang not in (None, "en", "zh"):
        raise ValueError(f"lang must be 'en', 'zh' or None, got {lang!r}")
    path = _existing(path, "LongText-Bench prompt file or folder")
    if path.is_file():
        return _read_longtext_file(path, lang, "")
    if lang is not None:
        return _read_longtext_file(_existing(path / _LONGTEXT_FILES[lang], f"LongText-Bench {lang} prompts"), lang, "")
    prompts = []
    for code, name in _LONGTEXT_FILES.items():
        if (path / name).is_file():
            prompts += _read_longtext_file(path / name, code, f"{code}/")
    if not prompts:
        raise FileNotFoundError(f"{path} has neither {' nor '.join(_LONGTEXT_FILES.values())}")
    return prompts


LOADERS: dict[str, Callable[..., list[BenchmarkPrompt]]] = {
    "geneval": load_geneval,
    "dpg_bench": load_dpg_bench,
    "longtext_bench": load_longtext_bench,
}


def load_benchmark(name: str, path: str | Path, **kwargs: Any) -> list[BenchmarkPrompt]:
    """Dispatch to the loader for ``name`` (one of ``LOADERS``)."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[name](path, **kwargs)
