"""``world_alignment``: the built-in data world's pixel detector as a reward.

Applies to images generated for world prompts, i.e. metas carrying the world's ``skill`` and
``include`` request (``WorldSample.meta``); any other meta - a free-text or LongText prompt, a
GenEval prompt - and the world's own "text" skill (which OCR scores) give ``None``.
"""
from __future__ import annotations

from typing import Literal

from PIL import Image

from megatron_xomni.rewards.registry import register_reward


@register_reward("world_alignment")
class WorldAlignmentReward:
    """Score = the detector's ``fraction`` of passed checks (default: a dense RL signal) or its
    all-or-nothing GenEval-style ``score``."""

    def __init__(self, field: Literal["fraction", "score"] = "fraction") -> None:
        if field not in ("fraction", "score"):
            raise ValueError(f"field must be 'fraction' or 'score', got {field!r}")
        self.field = field

    def __call__(self, prompts: list[str], images: list[Image.Image], metas: list[dict]) -> list[float | None]:
        # Imported here so the rewards package imports before/without the world package.
        from megatron_xomni.world.detector import score_image

        out: list[float | None] = []
        for image, meta in zip(images, metas):
            if not isinstance(meta, dict) or "skill" not in meta or "include" not in meta:
                out.append(None)
                continue
            value = score_image(image, meta)[self.field]
            out.append(None if value is None else float(value))
        return out
