"""LongText-Bench text-rendering accuracy (X-Omni, arXiv 2507.22058).

What is implemented (matching the published scorer's behaviour as documented by the benchmark
and its public re-implementations):

1. Ground truth: the prompt's ``text`` field; a list of strings is joined with single spaces.
2. Normalisation keeps only CJK unified ideographs (U+4E00-U+9FA5), ASCII letters and digits and
   the French accented letters ``àâäéèêëîïôöùûüç`` (either case); everything else - punctuation,
   symbols, other scripts - is deleted *without* inserting a space (so ``"well-known"`` becomes
   ``"wellknown"``, as in the published scorer).
   * English (``lang="en"``): whitespace is kept, the string is lower-cased and split on
     whitespace into words.
   * Chinese (``lang="zh"``): whitespace is dropped too and the result is split into single
     characters (Latin letters and digits count as characters; no lower-casing).
3. Order-free multiset match: ``matched = |Counter(gt) & Counter(ocr)|`` (each word/character
   counts at most as often as it occurs in both), ``accuracy = matched / |gt|``; an empty
   ground truth scores 0.
4. Benchmark score: total matched over total ground-truth units across all images (a micro
   average; each prompt is sampled 4 times). ``LongTextReport.mean_accuracy`` gives the
   per-image macro average as well.

The OCR engine is pluggable: any callable ``image -> str``; the default is RapidOCR (the paper
scores with a Qwen2.5-VL-7B OCR prompt, which can be plugged in the same way).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Sequence

from PIL import Image

if TYPE_CHECKING:
    from megatron_xomni.evaluation.benchmarks import BenchmarkPrompt

Lang = Literal["en", "zh"]
OCRFn = Callable[[Image.Image], str]

_KEPT = "\u4e00-\u9fa5a-zA-Z0-9àâäéèêëîïôöùûüçÀÂÄÉÈÊËÎÏÔÖÙÛÜÇ"
_DROP_EN = re.compile(f"[^{_KEPT}\\s]")
_KEEP_ZH = re.compile(f"[{_KEPT}]")
_CJK = re.compile("[\u4e00-\u9fa5]")


def detect_lang(text: str | Sequence[str]) -> Lang:
    """``"zh"`` if the text contains any CJK unified ideograph, else ``"en"``."""
    return "zh" if _CJK.search(_join(text)) else "en"


def _join(text: str | Sequence[str]) -> str:
    if isinstance(text, str):
        return text
    return " ".join(str(t) for t in text)


def normalize(text: str | Sequence[str], lang: Lang) -> list[str]:
    """Text -> the units LongText-Bench counts: lower-cased words (en) or characters (zh)."""
    text = _join(text)
    if lang == "en":
        return _DROP_EN.sub("", text).lower().split()
    if lang == "zh":
        return _KEEP_ZH.findall(text)
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def match_counts(gt: str | Sequence[str], ocr_text: str, lang: Lang | None = None) -> tuple[int, int]:
    """(matched units, ground-truth units) for one image; ``lang`` None -> detected from ``gt``."""
    lang = lang or detect_lang(gt)
    gt_units = Counter(normalize(gt, lang))
    ocr_units = Counter(normalize(ocr_text, lang))
    return sum((gt_units & ocr_units).values()), sum(gt_units.values())


def text_accuracy(gt: str | Sequence[str], ocr_text: str, lang: Lang | None = None) -> float:
    """LongText-Bench accuracy of one OCR reading against the ground-truth text (0 if gt is empty)."""
    matched, total = match_counts(gt, ocr_text, lang)
    return matched / total if total else 0.0


@dataclass
class LongTextResult:
    """Score of one generated image."""

    # Benchmark prompt id the image was generated for.
    prompt_id: str
    # 'en' or 'zh': which normalisation was used.
    lang: str
    # What the OCR engine read.
    ocr_text: str
    # Multiset-matched ground-truth units.
    matched: int
    # Ground-truth units (words or characters).
    total: int
    # Image file the result came from, if read from disk.
    image_path: str | None = None

    @property
    def accuracy(self) -> float:
        return self.matched / self.total if self.total else 0.0


@dataclass
class LongTextReport:
    """All image results plus the benchmark aggregates."""

    results: list[LongTextResult] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """The benchmark score: sum of matched over sum of ground-truth units (micro average)."""
        total = sum(r.total for r in self.results)
        return sum(r.matched for r in self.results) / total if total else 0.0

    @property
    def mean_accuracy(self) -> float:
        """Mean of per-image accuracies (macro average)."""
        return sum(r.accuracy for r in self.results) / len(self.results) if self.results else 0.0

    def by_lang(self) -> dict[str, float]:
        """Benchmark score per language."""
        out = {}
        for lang in sorted({r.lang for r in self.results}):
            out[lang] = LongTextReport([r for r in self.results if r.lang == lang]).accuracy
        return out


def _lang_of(prompt: "BenchmarkPrompt") -> Lang:
    return prompt.meta.get("lang") or detect_lang(prompt.meta["text"])


def evaluate_images(
    items: Iterable[tuple["BenchmarkPrompt", Image.Image]], ocr: OCRFn | None = None
) -> LongTextReport:
    """Score (prompt, generated image) pairs; several images per prompt are simply several pairs."""
    if ocr is None:
        from megatron_xomni.evaluation.ocr import default_ocr

        ocr = default_ocr()
    report = LongTextReport()
    for prompt, image in items:
        if "text" not in prompt.meta:
            raise ValueError(f"prompt {prompt.id!r} has no meta['text']; load it with load_longtext_bench")
        lang = _lang_of(prompt)
        read = ocr(image)
        matched, total = match_counts(prompt.meta["text"], read, lang)
        report.results.append(LongTextResult(prompt.meta.get("prompt_id", prompt.id), lang, read, matched, total))
    return report


def _id_key(pid: object) -> int | str:
    text = str(pid)
    return int(text) if text.isdigit() else text


def evaluate_image_dir(
    prompts: Sequence["BenchmarkPrompt"], image_dir: str | Path, ocr: OCRFn | None = None
) -> LongTextReport:
    """Score a folder laid out as the benchmark expects: ``{prompt_id}_{repeat}.png`` (or
    ``{prompt_id}.png``) for each prompt; prompts without images are skipped, unknown ids are an error."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"LongText-Bench image folder {image_dir} does not exist")
    # Ids are compared as integers when numeric: files are "0000_1.png" while a prompt file may
    # store prompt_id as "0000" or 0.
    by_id = {_id_key(p.meta.get("prompt_id", p.id)): p for p in prompts}
    paths = sorted(image_dir.glob("*.png"))
    if not paths:
        raise ValueError(f"{image_dir} holds no .png images; expected files named {{prompt_id}}_{{repeat}}.png")
    pairs = []
    for path in paths:
        pid = path.stem.split("_")[0]
        if _id_key(pid) not in by_id:
            raise ValueError(f"{path.name}: prompt id {pid!r} is not in the loaded prompts; check the language/file")
        pairs.append((by_id[_id_key(pid)], path))

    def items():
        for prompt, path in pairs:
            with Image.open(path) as im:
                yield prompt, im.convert("RGB")

    report = evaluate_images(items(), ocr)
    for result, (_, path) in zip(report.results, pairs):
        result.image_path = str(path)
    return report
