"""One training (or evaluation) step through megatron-core's pipeline schedules.

Batches are dicts of [micro_batch, seq] tensors: `tokens`, `labels`, `loss_mask` (float),
`position_ids`. Every pipeline stage receives the batch: X-Omni's vision blocks and final
norm need each stage's image-position mask, which is derived from `tokens`.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


def loss_func(loss_mask: torch.Tensor, labels: torch.Tensor, text_vocab_size: int, per_token_loss: torch.Tensor):
    """(sum of masked token losses, number of masked tokens, per-modality sums for logging)."""
    mask = loss_mask.float()
    losses = per_token_loss.float() * mask
    loss_sum = losses.sum()
    is_image = (labels >= text_vocab_size).float()
    stats = torch.stack([
        (losses * (1 - is_image)).sum().detach(), (mask * (1 - is_image)).sum(),
        (losses * is_image).sum().detach(), (mask * is_image).sum(),
    ])
    return loss_sum, mask.sum().to(torch.int), {"loss": stats}


def _forward_step(text_vocab_size: int, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"], batch["labels"], text_vocab_size)


def forward_backward(
    chunks: list,
    microbatches: list[dict],
    text_vocab_size: int,
    pg_collection,
    forward_only: bool = False,
) -> dict:
    """Run all micro-batches. Returns token-weighted mean losses, identical on every rank:
    {"loss", "text_loss", "image_loss", "tokens"} (a modality without targets has loss nan)."""
    seq_length = microbatches[0]["tokens"].shape[1]
    mbs = microbatches[0]["tokens"].shape[0]
    fb = get_forward_backward_func(
        pp_size=pg_collection.pp.size(), vp_size=len(chunks) if len(chunks) > 1 else None
    )
    iters = [iter(microbatches) for _ in chunks]
    store = fb(
        forward_step_func=partial(_forward_step, text_vocab_size),
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    stats = torch.zeros(4, dtype=torch.float64)
    for item in store or []:
        stats += item["loss"].double()
    # Only the last stage has losses; sum over PP (others contribute 0) and DP.
    torch.distributed.all_reduce(stats, group=pg_collection.pp)
    torch.distributed.all_reduce(stats, group=pg_collection.dp_cp)
    t_sum, t_n, i_sum, i_n = stats.tolist()
    nan = float("nan")
    return {
        "loss": (t_sum + i_sum) / max(t_n + i_n, 1.0),
        "text_loss": t_sum / t_n if t_n else nan,
        "image_loss": i_sum / i_n if i_n else nan,
        "tokens": t_n + i_n,
    }


def forward_logits(chunks: list, microbatches: list[dict], pg_collection) -> list[torch.Tensor]:
    """Gathered full logits [b, s, V_text + image_table] per micro-batch (last stage; [] elsewhere)."""
    seq_length = microbatches[0]["tokens"].shape[1]
    mbs = microbatches[0]["tokens"].shape[0]

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
        if isinstance(out, tuple):  # last stage: (text, image) logits
            out = torch.cat(out, dim=-1)
        return out, lambda o, non_loss_data=True: o.detach().clone()

    fb = get_forward_backward_func(
        pp_size=pg_collection.pp.size(), vp_size=len(chunks) if len(chunks) > 1 else None
    )
    iters = [iter(microbatches) for _ in chunks]
    with torch.no_grad():
        store = fb(
            forward_step_func=step,
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return list(store or [])


def model_sharded_state_dict(chunks: list) -> dict:
    """{'model': ...} (or model0, model1, ... with virtual pipeline stages) for dist-ckpt."""
    def unwrap(m):
        return m.module if hasattr(m, "module") and not hasattr(m, "model_cfg") else m

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def load_model_state(chunks: list, loaded: dict) -> None:
    def unwrap(m):
        return m.module if hasattr(m, "module") and not hasattr(m, "model_cfg") else m

    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=False)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"], strict=False)
