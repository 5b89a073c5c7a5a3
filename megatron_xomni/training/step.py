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
    {"loss", "text_loss", "image_loss", "tokens"} (a modality without targets has loss nan), plus the
    per-modality target counts and loss sums ("text_tokens", "image_tokens", "*_loss_sum")."""
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
        "tokens": t_n + i_n, "text_tokens": t_n, "image_tokens": i_n,
        "text_loss_sum": t_sum, "image_loss_sum": i_sum,
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


def _unwrap(m):
    return m.module if hasattr(m, "module") and not hasattr(m, "model_cfg") else m


def _chunk_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state_dict(chunks: list, metadata: dict | None = None) -> dict:
    """{'model': ...} (or model0, model1, ... with virtual pipeline stages) for dist-ckpt."""
    return {k: _unwrap(c).sharded_state_dict(metadata=metadata) for k, c in zip(_chunk_keys(chunks), chunks)}


# The distributed optimizer's default checkpoint format (fully_sharded_model_space) is refused by
# megatron-core 0.16.1's own saver, and `dp_reshardable` restores a wrong Adam step and reshards
# over DP only. `fully_reshardable` stores each optimizer tensor in model space (the shape of its
# parameter), so one checkpoint loads at any TP/PP/DP - the same format the plain optimizer writes.
OPTIMIZER_CHECKPOINT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,  # same keys whether or not megatron chains sub-optimizers
}


def train_state_sharded_dict(chunks: list, optimizer, is_loading: bool = False) -> dict:
    """Model + optimizer sharded state dict of a training checkpoint.

    The model keeps megatron-core's stacked layer tensors (`decoder.layers.<name>` of shape
    [num_layers, ...]), which every loader reads. The optimizer state is keyed per layer
    (`decoder.layers.<global index>.<name>`, megatron-core's non-homogeneous layout): with frozen
    layers (PT-1) only some layers have optimizer state, and a stacked tensor that is only partly
    written is an invalid access pattern for dist-ckpt. The global index makes it PP/VPP-independent.
    """
    state = model_sharded_state_dict(chunks)
    per_layer = model_sharded_state_dict(chunks, metadata={"non_homogeneous_layers": True})
    if is_loading:
        _materialize_adam_state(optimizer)
    state["optimizer"] = optimizer.sharded_state_dict(per_layer, is_loading=is_loading,
                                                      metadata=dict(OPTIMIZER_CHECKPOINT_METADATA))
    return state


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]


def _materialize_adam_state(optimizer) -> None:
    """Adam creates its state lazily at the first step, but the distributed optimizer's load path reads
    the (empty) state to build its request: give every parameter zero moments and a step counter."""
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                st.setdefault("step", torch.tensor(0.0))


def _load_optimizer(optimizer, state) -> None:
    """optimizer.load_state_dict, around two megatron-core 0.16.1 defects of the distributed optimizer
    with torch's Adam (no Transformer Engine / Apex, so `step` lives in each parameter's state):
    the fully_reshardable loader copies every state key, `step` included, from a source that has no
    `step` (KeyError), and one `step` tensor is shared by every parameter, which torch's Adam then
    increments once per parameter per step. The step is restored from the param groups as usual."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    states = [state] if len(opts) == 1 else [v for _, v in sorted(state.items())]
    for opt, sd in zip(opts, states):
        if isinstance(opt, DistributedOptimizer) and sd.get("param_state_sharding_type") == "fully_reshardable":
            sd = dict(sd)
            param_state = sd.pop("param_state")
            sd.pop("param_state_sharding_type")
            opt.load_state_dict(sd)  # param groups, step, grad scaler
            steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
            opt.load_parameter_state_from_fully_reshardable(param_state)
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step
        else:
            opt.load_state_dict(sd)
    if len(opts) > 1:
        optimizer._synchronize_steps()
    for inner in _inner_optimizers(optimizer):
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def load_train_state(chunks: list, optimizer, loaded: dict) -> None:
    """Restore model and optimizer from a loaded `train_state_sharded_dict`."""
    load_model_state(chunks, loaded)
    _load_optimizer(optimizer, loaded["optimizer"])


def load_model_state(chunks: list, loaded: dict) -> None:
    for key, chunk in zip(_chunk_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=False)
