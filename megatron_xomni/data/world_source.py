"""The built-in world as a data source: its prompt streams as a `PromptSource`, its images as an
image-text source. With the world reward and the world benchmark, this is the only importer of
`megatron_xomni.world` (imported lazily: real corpora and prompt files never need it).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from megatron_xomni.data.corpus_source import BatchShape, ImageTextSource, pil_to_pixels
from megatron_xomni.data.prompts import PromptSource, has_value


def check_world_skills(skills: Sequence[str], what: str = "skills") -> None:
    from megatron_xomni.world import SKILLS

    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"{what}: unknown world skill(s) {unknown}; choose from {', '.join(SKILLS)}")


class WorldPromptSource(PromptSource):
    """Row i = world sample i of the chosen stream: {"id", "prompt": its caption, **its meta} (the
    meta holds the detector's `include`, the OCR `text` - None where a skill asks for none -, the
    skill, ...). Skills cycle: row i has skills[i % len(skills)]. Endless."""

    def __init__(self, split: str = "train", seed: int = 777, skills: Sequence[str] = (),
                 height: int = 64, width: int = 64) -> None:
        from megatron_xomni.world import SKILLS

        check_world_skills(skills)
        if split not in ("train", "heldout"):
            raise ValueError(f"world split {split!r}: choose train or heldout")
        self.split, self.seed, self.height, self.width = split, seed, height, width
        self.skills = list(skills) or list(SKILLS)
        self.name = f"world/{split}"
        self.num_rows = None

    def sample(self, index: int):
        """The WorldSample behind row `index` (image included)."""
        from megatron_xomni.world import held_out_sample, sample_world

        draw = sample_world if self.split == "train" else held_out_sample
        return draw(index, seed=self.seed, height=self.height, width=self.width,
                    skill=self.skills[index % len(self.skills)])

    def _row(self, index: int) -> dict:
        s = self.sample(index)
        return {**s.meta, "id": f"world/{self.split}/{self.seed}/{index}", "prompt": s.caption}

    def fields(self) -> set[str]:
        # which fields carry a value depends only on the skill: one row per skill tells them all
        return set().union(*({k for k, v in self[i].items() if has_value(v)} for i in range(len(self.skills))))


class WorldImageSource(ImageTextSource):
    """Record g = world training sample g of world `seed`, rendered at size x size (skill drawn by
    the world's own mix, or skills[g % len(skills)]). Endless; use it with a fixed BatchShape."""

    def __init__(self, seed: int = 0, size: int = 64, skills: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if skills is not None:
            check_world_skills(skills)
        self.seed, self.size, self.skills = seed, size, list(skills) if skills else None
        self.name = f"world(seed={seed}, {size}px)"

    def _record(self, index: int, shape: BatchShape):
        from megatron_xomni.world import sample_world

        skill = self.skills[index % len(self.skills)] if self.skills else None
        s = sample_world(index, seed=self.seed, height=self.size, width=self.size, skill=skill)
        self.report.count_yielded()
        return s.image, s.caption, s.meta


def world_images(indices: Iterable[int], size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """World training images `indices` as pixels [B, 3, size, size] in [-1, 1], and their captions."""
    batch = WorldImageSource(seed, size).gather(indices, BatchShape.fixed(size))
    return batch["pixels"], batch["prompts"]
