"""Per-token log-probs of given sequences, recomputed in a training forward (vocab-parallel).

log p(token) = -cross_entropy from the model's own modality loss (`XOmniModel.modality_loss`,
megatron-core's `vocab_parallel_cross_entropy`): image targets are scored by the image head
over the codes (its spare slots are -inf), text targets by the text head. This is the same
distribution a rollout samples from at temperature 1 before any logit processing.

Batches are dicts of [rows, seq] tensors built by `pack_rollouts`: inputs `tokens`, next-token
`labels`, `position_ids`, `action_mask` (1.0 where the label was *sampled*) and
`old_logprobs` (the rollout's log-probs at those positions, 0 elsewhere).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_xomni.inference.generation import Rollout, _unwrap


def pack_rollouts(rollouts: Sequence[Rollout], pad_id: int = 0, length: Optional[int] = None) -> dict:
    """Right-padded training tensors [N, length] for next-token scoring of the rollouts.

    `length` defaults to the longest sequence minus one. Right padding is harmless under causal
    attention (real tokens never see the pads) and pads are outside `action_mask`.
    """
    if not rollouts:
        raise ValueError("pack_rollouts needs at least one rollout")
    longest = max(r.tokens.numel() for r in rollouts) - 1
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest rollout ({longest} scored positions)")
    n = len(rollouts)
    tokens = torch.full((n, length + 1), pad_id, dtype=torch.long)
    action = torch.zeros(n, length)
    old = torch.zeros(n, length)
    for i, r in enumerate(rollouts):
        tokens[i, : r.tokens.numel()] = r.tokens
        # Label position t scores tokens[t + 1]; sampled tokens sit at prompt_length .. +n_sampled.
        start = r.prompt_length - 1
        action[i, start : start + r.num_sampled] = 1.0
        old[i, start : start + r.num_sampled] = r.logprobs.float()
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(length).expand(n, length).contiguous(),
        "action_mask": action,
        "old_logprobs": old,
    }


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Consecutive row slices of every [N, ...] tensor in `batch` (N must divide evenly)."""
    n = next(iter(batch.values())).shape[0]
    if micro_batch_size < 1 or n % micro_batch_size:
        raise ValueError(
            f"{n} rows cannot be split into micro-batches of {micro_batch_size}: choose a micro_batch_size "
            f"that divides {n}"
        )
    return [{k: v[s : s + micro_batch_size] for k, v in batch.items()} for s in range(0, n, micro_batch_size)]


def _device(chunks) -> torch.device:
    return next(_unwrap(chunks[0]).parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def broadcast_from_last_stage(t: Optional[torch.Tensor], shape, pg, device) -> torch.Tensor:
    """A float32 tensor that exists on the last pipeline stage, copied to every stage."""
    if pg.pp.size() == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=torch.float32, device=device)
    src = torch.distributed.get_process_group_ranks(pg.pp)[-1]
    torch.distributed.broadcast(t, src=src, group=pg.pp)
    return t


def scored_span(batch: dict, text_vocab_size: int) -> dict:
    """What a scoring forward of this (CPU) micro-batch must compute: {"logits_from", "only_head"}.

    `logits_from`: the first label position any row samples at (earlier positions are prompt);
    `only_head`: "image" / "text" when every sampled label is of that modality (an image rollout
    needs no text-head logits, a text rollout no image-head logits), else None (both heads).
    """
    mask = batch["action_mask"] > 0
    cols = mask.any(0).nonzero()
    start = int(cols[0]) if cols.numel() else 0
    is_image = batch["labels"][mask] >= text_vocab_size
    head = None
    if is_image.numel():
        head = "image" if bool(is_image.all()) else "text" if not bool(is_image.any()) else None
    return {"logits_from": start, "only_head": head}


def forward_seq_length(microbatches: Sequence[dict], pp_size: int) -> int:
    """The `seq_length` a forward_backward call over these micro-batches takes.

    Without pipeline parallelism megatron-core ignores it and every micro-batch keeps its own length;
    with it, it sets the p2p tensor shapes, so all micro-batches of the call must share one length.
    """
    lengths = {m["tokens"].shape[1] for m in microbatches}
    if pp_size > 1 and len(lengths) > 1:
        raise ValueError(f"pipeline parallelism needs one sequence length per forward_backward call, got "
                         f"{sorted(lengths)}: pack the call's micro-batches to one length (pack_rollouts length=)")
    return max(lengths)


def compute_logprobs(chunks: list, pg, microbatches: list[dict], spans: Optional[list[dict]] = None) -> list[torch.Tensor]:
    """Log-probs [b, s] of each micro-batch's `labels` (no grad, on the device), the same on every rank of
    the replica; micro-batches may differ in length without pipeline parallelism.

    With spans (`spans`, or the `logits_from` / `only_head` keys `scored_span` put in a micro-batch) only
    the sampled positions are exact: positions before `logits_from` and targets of the skipped head are 0.
    """
    device = _device(chunks)
    mbs = []
    for j, m in enumerate(microbatches):
        b = _to({k: m[k] for k in ("tokens", "labels", "position_ids")}, device)
        b.update(spans[j] if spans else {k: m[k] for k in ("logits_from", "only_head") if k in m})
        mbs.append(b)
    seq = forward_seq_length(mbs, pg.pp.size())

    def step(data_iterator, model):
        b = next(data_iterator)
        start = b.get("logits_from", 0)
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], logits_from=start,
                    only_head=b.get("only_head"))

        def collect(o, non_loss_data=True):
            return F.pad((-o).detach().float(), (start, 0)) if start else (-o).detach().float()

        return out, collect

    fb = get_forward_backward_func(pp_size=pg.pp.size(), vp_size=len(chunks) if len(chunks) > 1 else None)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            store = fb(
                forward_step_func=step,
                data_iterator=[iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs),
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(mbs),
                seq_length=seq,
                micro_batch_size=mbs[0]["tokens"].shape[0],
                forward_only=True,
                collect_non_loss_data=True,
            )
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    if pg.pp.size() == 1:
        return list(store)
    # One length under PP (checked above): one broadcast of all micro-batches from the last stage.
    rows = [m["tokens"].shape[0] for m in mbs]
    local = torch.cat(list(store), 0) if store else None
    return list(broadcast_from_last_stage(local, (sum(rows), seq), pg, device).split(rows))


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Entropy (nats) of softmax over the full vocabulary from vocab-parallel logits [..., V/TP].

    -inf entries (masked slots) contribute zero probability: they are clamped to the lowest finite
    float before exp (exp gives exactly 0, and 0 times a finite number is 0, where 0 * -inf is nan).
    Two passes over the logits besides the max (shift, exp) and two reductions, no temporaries beyond them.
    """
    logits = logits.float()
    m = logits.max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = (logits - m).clamp_(min=torch.finfo(torch.float32).min)
    e = torch.exp(shifted)
    s = e.sum(-1)
    t = torch.linalg.vecdot(e, shifted)
    both = torch.stack([s, t])
    torch.distributed.all_reduce(both, group=tp_group)
    s, t = both[0], both[1]
    return torch.log(s) - t / s


def policy_logprobs_and_entropy(model, output, labels: torch.Tensor, pg) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs with grad, entropy without grad), both [b, s], from a last-stage forward output.

    `output` is the (text, image) vocab-parallel logits [b, s, V/TP] a forward without labels
    returns (one of them None after `only_head`; `labels` then sliced as the logits are); log-probs
    reuse the model's modality loss, entropy is that of the head that scores each target (image
    head over the codes for image targets, text head otherwise; 0 where that head was skipped).
    """
    text, image = output
    core = _unwrap(model)
    is_image = labels >= core.model_cfg.text_vocab_size
    # Entropy first: megatron-core's vocab-parallel cross entropy works in place on fp32 logits.
    ents = [None if x is None else vocab_parallel_entropy(x, pg.tp) for x in (text, image)]
    zero = torch.zeros_like(next(e for e in ents if e is not None))
    ent = torch.where(is_image, zero if ents[1] is None else ents[1], zero if ents[0] is None else ents[0])
    logp = -core.modality_loss(labels, text, image, batch_first=True)
    return logp, ent
