"""``ocr_text``: does the image contain the text the prompt asked to render?

Score = LongText-Bench accuracy (order-free multiset match of words / CJK characters, see
``megatron_xomni.evaluation.longtext``) of the OCR reading against ``meta["text"]`` (a string or
a list of strings). Not applicable (``None``) when the meta has no text, or the text has no
countable word/character after normalisation. Row field: ``text`` (``text_key``); a row
without it is a counted failure (``RewardEnsemble``), ``"text": null`` marks a prompt that asks for
no text. The paper uses GOT-OCR 2.0 + PaddleOCR; the
default here is RapidOCR's PP-OCR models on CPU, created once per process.
"""
from __future__ import annotations

from typing import Callable, Literal

from PIL import Image

from megatron_xomni.evaluation.longtext import detect_lang, match_counts
from megatron_xomni.rewards.registry import register_reward


@register_reward("ocr_text")
class OCRTextReward:
    """``ocr``: any ``image -> str`` callable (default: the shared RapidOCR engine);
    ``lang``: force 'en'/'zh' normalisation (default: ``meta["lang"]``, else detected from the text)."""

    @staticmethod
    def required_fields(text_key: str = "text", **_) -> tuple[str, ...]:
        """The row field holding the text the image should show."""
        return (text_key,)

    def __init__(
        self,
        ocr: Callable[[Image.Image], str] | None = None,
        lang: Literal["en", "zh"] | None = None,
        text_key: str = "text",
    ) -> None:
        if lang not in (None, "en", "zh"):
            raise ValueError(f"lang must be 'en', 'zh' or None, got {lang!r}")
        self._ocr = ocr
        self.lang = lang
        self.text_key = text_key

    @property
    def ocr(self) -> Callable[[Image.Image], str]:
        if self._ocr is None:
            from megatron_xomni.evaluation.ocr import default_ocr

            self._ocr = default_ocr()  # cached per process: model load is the slow part
        return self._ocr

    def __call__(self, prompts: list[str], images: list[Image.Image], metas: list[dict]) -> list[float | None]:
        out: list[float | None] = []
        for image, meta in zip(images, metas):
            gt = meta.get(self.text_key) if isinstance(meta, dict) else None
            if not gt:
                out.append(None)
                continue
            lang = self.lang or meta.get("lang") or detect_lang(gt)
            # Normalise the ground truth first: skip OCR when nothing is countable.
            if match_counts(gt, "", lang)[1] == 0:
                out.append(None)
                continue
            matched, total = match_counts(gt, self.ocr(image), lang)
            out.append(matched / total)
        return out
