"""One micro-batch plan per GRPO step: the reference log-prob recompute and every update of every
ppo epoch run on the same packed micro-batches.

A minibatch part's rows (`grpo.update_rows`) are ordered by length, as the rollouts were bucketed by
prompt length, and split into micro-batches of `micro_batch_size` rows. Each micro-batch is packed
once (`pack_rollouts`) to its own longest rollout, not the whole step's, its `scored_span` is computed
once and its tensors go to the device once. Under pipeline parallelism one forward_backward call needs
one sequence length (the p2p tensor shapes; megatron-core's `variable_seq_lengths` is off), so there
the micro-batches of a part are packed to the part's longest instead.

The split does not change the objective: the per-token loss weights carry the minibatch's global
normaliser (`grpo.loss_weights`), so a row weighs the same in whichever micro-batch it lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_xomni.rl.logprobs import _to, pack_rollouts, scored_span
from megatron_xomni.inference.generation import Rollout


@dataclass
class PartPlan:
    """The micro-batches of one minibatch part, ready on the device."""

    rows: list[int]
    """Rollout indices in micro-batch order (micro-batch j holds rows[j * mbs : (j + 1) * mbs])."""
    microbatches: list[dict]
    """`pack_rollouts` tensors (+ `advantages`, dropped rows' `action_mask` zeroed) on the device,
    with their `scored_span` keys `logits_from` and `only_head`."""
    real_tokens: int
    """Positions of these rows that are not padding (each row's length - 1)."""

    @property
    def packed_tokens(self) -> int:
        """Positions one forward over the part computes (rows x each micro-batch's length)."""
        return sum(m["tokens"].numel() for m in self.microbatches)


def plan_part(rollouts: Sequence[Rollout], rows: Sequence[int], keep: Sequence[bool], advantages: torch.Tensor,
              micro_batch_size: int, *, pad_id: int, text_vocab_size: int, one_length: bool, device) -> PartPlan:
    """Pack `rows` of `rollouts` into micro-batches of `micro_batch_size` (see the module docstring).

    `keep[i]` False: row i only pads a micro-batch (its action mask is zeroed, so it weighs 0);
    `one_length`: pad every micro-batch to the part's longest row (pipeline parallelism).
    """
    if not rows or len(rows) % micro_batch_size:
        raise ValueError(f"{len(rows)} rows cannot be split into micro-batches of {micro_batch_size}: "
                         f"choose a micro_batch_size that divides it")
    # Rows of similar length share a micro-batch: sorting, then cutting into consecutive chunks, gives
    # the fewest padded positions for a fixed micro-batch size; ties keep prompt-length buckets together.
    order = sorted(rows, key=lambda i: (rollouts[i].tokens.numel(), rollouts[i].prompt_length, i))
    length = max(rollouts[i].tokens.numel() for i in order) - 1 if one_length else None
    mbs = []
    for s in range(0, len(order), micro_batch_size):
        idx = order[s: s + micro_batch_size]
        m = pack_rollouts([rollouts[i] for i in idx], pad_id, length)
        m["action_mask"] *= torch.tensor([float(keep[i]) for i in idx]).unsqueeze(-1)  # padding rows weigh 0
        m["advantages"] = advantages[idx]
        span = scored_span(m, text_vocab_size)
        m = _to(m, device)
        m.update(span)
        mbs.append(m)
    return PartPlan(rows=order, microbatches=mbs, real_tokens=sum(rollouts[i].tokens.numel() - 1 for i in order))
