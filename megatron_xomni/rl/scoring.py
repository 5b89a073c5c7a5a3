"""Decode and score a step's images once per model replica, not once per TP/PP/CP peer.

Every model-parallel peer of a data-parallel replica holds the same rollouts (generation ends with
the sampled codes on every peer). Decoding and scoring them on each peer repeats the most expensive
work of a GRPO step TP x PP times. Here the images are cut into the renderer's batches
(`Renderer.batch_size`) and peer r of the model-parallel group decodes and scores batches r,
r + size, r + 2 size, ...; the per-image rewards (one float per component, plus failure and
missing-field counts) are then gathered over that group, so every peer sees the full `RewardResult`
and feeds identical advantages to the update.

The result equals the redundant path bit for bit: each image is rendered in the same batch, with
the same seed, as there (its noise is seeded per image, but CPU GEMMs round differently for other
batch sizes, so a split by single images is off by one pixel level now and then, measured), and
each reward scores one image at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_xomni.rewards.registry import RewardResult


def decode_and_score(renderer, rewards, codes: torch.Tensor, seeds: Sequence[int], captions: Sequence[str],
                     metas: Sequence[dict], group: Optional[torch.distributed.ProcessGroup] = None):
    """(images this rank rendered as {index: PIL image}, the RewardResult of all images).

    `group`: the peers that hold the same rollouts (the model-parallel group); None or a group of one
    decodes and scores everything here."""
    n = len(captions)
    size = 1 if group is None else torch.distributed.get_world_size(group)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    step = renderer.batch_size
    mine = [i for start in range(rank * step, n, size * step) for i in range(start, min(start + step, n))]
    images = renderer(codes[mine], [seeds[i] for i in mine], [captions[i] for i in mine]) if mine else []
    local = rewards([captions[i] for i in mine], images, [metas[i] for i in mine]) if mine else None
    shards = [(mine, local)]
    if size > 1:
        shards = [None] * size
        torch.distributed.all_gather_object(shards, (mine, local), group=group)
    return dict(zip(mine, images)), merge_results(shards, n, list(rewards.components))


def merge_results(shards, n: int, names: list[str]) -> RewardResult:
    """One RewardResult over n images from (global indices, RewardResult of those indices) pairs."""
    total: list = [None] * n
    components = {name: [None] * n for name in names}
    failures: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    missing: dict[str, int] = {}
    for index, part in shards:
        if part is None:
            continue
        for j, i in enumerate(index):
            total[i] = part.total[j]
            for name in names:
                components[name][i] = part.components[name][j]
        for name, failed in part.failures.items():
            failures.setdefault(name, []).extend(index[j] for j in failed)
        errors.update(part.errors)
        for name, count in part.missing_fields.items():
            missing[name] = missing.get(name, 0) + count
    return RewardResult(total, components, {k: sorted(v) for k, v in failures.items()}, errors, missing)
