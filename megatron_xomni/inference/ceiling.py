"""The rendering ceiling: what the frozen tokenizer + decoder can show at best, per skill.

Held-out prompts' *ground-truth* images are encoded by the tokenizer, their codes rendered by the
decoder with K decoder seeds, and each render scored by the world detector's partial credit (the
fraction of the prompt's checks that pass: the RL reward). No policy can score above this on average:
its images go through the same decoder. K > 1 also measures the decoder's own noise: the share of the
reward variance that is between seeds of the same codes.

    rendering_ceiling(tok, decoder, [WorldPromptSource("heldout", 12345, skills).sample(i) for i in range(48)])
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_xomni.data.corpus_source import pil_to_pixels


def _to_pil(pixels: torch.Tensor):
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def render_codes(tokenizer, decoder, codes: torch.Tensor, seeds: Sequence[int], steps: int, batch_size: int = 64):
    """Codes [B, h, w] -> B PIL images, image i decoded with generator seed seeds[i]."""
    from megatron_xomni.models.flux_decoder.sampling import sample_from_codes

    images = []
    for s in range(0, len(codes), batch_size):
        gens = [int(x) for x in seeds[s:s + batch_size]]
        images += _to_pil(sample_from_codes(decoder, tokenizer, codes[s:s + batch_size], num_inference_steps=steps,
                                            generator=gens))
    return images


@torch.no_grad()
def rendering_ceiling(tokenizer, decoder, prompts: Sequence, seeds: int = 4, steps: int = 8,
                      base_seed: int = 2024) -> dict:
    """Ceiling of ground-truth codes over `prompts` (world samples with meta), each decoded `seeds` times.

    Returns {"ceiling": mean partial credit, "per_skill": {skill: mean}, "all_or_nothing": share of
    renders passing every check, "seed_variance_share": mean within-codes variance / total variance,
    "rewards": [prompt][seed], "num_prompts", "seeds"}."""
    from megatron_xomni.rewards.world_alignment import WorldAlignmentReward

    reward = WorldAlignmentReward("fraction")
    prompts = list(prompts)
    codes = tokenizer.eval().encode(pil_to_pixels([p.image for p in prompts]))
    rewards = np.zeros((len(prompts), seeds))
    for k in range(seeds):
        draw = [base_seed * 7919 + i + 100_003 * k for i in range(len(prompts))]
        scores = reward([p.caption for p in prompts], render_codes(tokenizer, decoder, codes, draw, steps),
                        [p.meta for p in prompts])
        rewards[:, k] = [0.0 if v is None else v for v in scores]
    skills = [p.meta["skill"] for p in prompts]
    per_skill = {s: float(rewards[[i for i, t in enumerate(skills) if t == s]].mean()) for s in dict.fromkeys(skills)}
    total = rewards.var()
    within = rewards.var(axis=1).mean() if seeds > 1 else 0.0
    return {"ceiling": float(rewards.mean()), "per_skill": per_skill, "all_or_nothing": float((rewards == 1.0).mean()),
            "seed_variance_share": float(within / total) if total > 0 else 0.0, "rewards": rewards.tolist(),
            "num_prompts": len(prompts), "seeds": seeds}
