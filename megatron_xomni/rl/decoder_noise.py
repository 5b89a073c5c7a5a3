"""Decoder noise out of GRPO's advantage: common random numbers for the frozen decoder.

The decoder is not the policy. A rollout's reward is r(decode(codes, noise)): when the G samples of
a group are decoded with different noise, part of the within-group reward spread comes from the
noise, which the policy's tokens do not control, and the group-normalised advantage credits it
to the tokens anyway. Two knobs take it out:

- `shared=True` (common random numbers): the G samples of a group are decoded with one seed, so
  samples that differ only by noise no longer differ at all (identical codes -> identical images
  -> identical rewards -> zero advantage), and what is left of the spread comes from the codes.
- `decodes=K`: each rollout is decoded K times (decode k with seed k of its group) and the
  rewards averaged, which shrinks the noise left in the reward of a sequence by a factor K.

Seeds are a pure function of (run seed, step, group[, sample], decode), hashed with numpy's
SeedSequence, so a resumed run decodes exactly as an uninterrupted one, on any data-parallel split.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch


def decoder_seed(run_seed: int, step: int, group: int, decode: int = 0, sample: Optional[int] = None) -> int:
    """The decoder seed of (step, group, decode) - one per group - or, given `sample`, of one sample.

    A value in [0, 2**63) (what torch.Generator.manual_seed takes)."""
    words = [int(run_seed), int(step), int(group), int(decode)]
    if sample is not None:
        words.append(int(sample))
    if min(words) < 0:
        raise ValueError(f"decoder seeds are derived from non-negative integers, got {words}")
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rollout_decoder_seeds(run_seed: int, step: int, group_ids: Sequence[int], sample_ids: Sequence[int],
                          shared: bool = True, decode: int = 0) -> list[int]:
    """One decoder seed per rollout: its group's (shared) or its own (independent)."""
    return [decoder_seed(run_seed, step, g, decode, None if shared else s) for g, s in zip(group_ids, sample_ids)]


def averaged_rewards(decode_score: Callable, group_ids: Sequence[int], sample_ids: Sequence[int],
                     run_seed: int, step: int, shared: bool = True, decodes: int = 1) -> tuple[torch.Tensor, list, list]:
    """Decode every rollout `decodes` times and average its rewards.

    decode_score(seeds) -> (rewards: list of float, extra, images): one decode of every rollout with
    the given seeds, and its scores; extra is anything the caller logs (e.g. the reward ensemble's
    result). GRPO passes rl/scoring.py's sharded decode + score. Returns (rewards [N] float32: the
    mean over decodes, the `decodes` score extras, the images of decode 0).
    """
    if decodes < 1:
        raise ValueError(f"decodes={decodes} must be >= 1")
    per_decode, extras, first = [], [], None
    for k in range(decodes):
        values, extra, images = decode_score(rollout_decoder_seeds(run_seed, step, group_ids, sample_ids, shared, k))
        per_decode.append(torch.as_tensor(values, dtype=torch.float64))
        extras.append(extra)
        first = images if first is None else first
    return torch.stack(per_decode).mean(0).float(), extras, first
