"""The built-in world as a data source: its prompt streams as a `PromptSource`, its images as an
image-text source. With the world reward and the world benchmark, this is the only importer of
`megatron_xomni.world` (imported lazily: real corpora and prompt files never need it).
"""
from __future__ import annotations

from typing import Sequence

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
