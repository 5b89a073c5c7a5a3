"""``world_alignment``: the built-in data world's pixel detector as a reward.

Row field: ``include``, the detector's request - a list of ``{"shape", "count", "exact", "color",
"position"}`` objects, one per requested object group (see ``megatron_xomni.world.detector``; world
prompt rows carry it, and a JSONL prompt file can give it per row). Not applicable (``None``): an
``include`` that is ``null`` or empty, the world's own "text" skill (which OCR scores), and a request
that is not in the detector's vocabulary (a GenEval ``{"class": ...}`` spec: GenEval's own detector
scores those). A row without ``include`` is a counted failure (``RewardEnsemble``).
"""
from __future__ import annotations

from typing import Literal

from PIL import Image

from megatron_xomni.rewards.registry import register_reward


@register_reward("world_alignment")
class WorldAlignmentReward:
    """Score = the detector's ``fraction`` of passed checks (default: a dense RL signal) or its
    all-or-nothing GenEval-style ``score``."""

    required_fields = ("include",)

    def __init__(self, field: Literal["fraction", "score"] = "fraction") -> None:
        if field not in ("fraction", "score"):
            raise ValueError(f"field must be 'fraction' or 'score', got {field!r}")
        self.field = field

    def __call__(self, prompts: list[str], images: list[Image.Image], metas: list[dict]) -> list[float | None]:
        # Imported here so the rewards package imports before/without the world package.
        from megatron_xomni.world.detector import score_image

        out: list[float | None] = []
        for image, meta in zip(images, metas):
            include = meta.get("include") if isinstance(meta, dict) else None
            if not include or meta.get("skill") == "text":
                out.append(None)
                continue
            if not isinstance(include, list) or not all(isinstance(r, dict) for r in include):
                raise ValueError(f"row {meta.get('id', '?')}: 'include' must be a list of detector requests "
                                 f"({{\"shape\": ..., \"count\": ...}}), got {include!r:.80}")
            if any("class" in r and "shape" not in r for r in include):
                out.append(None)  # a GenEval request: GenEval's detector scores it, not the world's
                continue
            value = score_image(image, {"skill": meta.get("skill"), "include": include})[self.field]
            out.append(None if value is None else float(value))
        return out
