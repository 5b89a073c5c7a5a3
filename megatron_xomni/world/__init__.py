"""The built-in data world: seeded synthetic captioned images and a deterministic scorer.

    from megatron_xomni.world import sample_world, held_out_prompts, SKILLS
    from megatron_xomni.world.detector import score_image
"""

from megatron_xomni.world.scene import WorldConfig, WorldSample, held_out_prompts, held_out_sample, sample_world
from megatron_xomni.world.vocab import COLORS, PALETTE, RELATIONS, SHAPES, SKILLS

__all__ = [
    "COLORS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SKILLS",
    "WorldConfig",
    "WorldSample",
    "held_out_prompts",
    "held_out_sample",
    "sample_world",
]
