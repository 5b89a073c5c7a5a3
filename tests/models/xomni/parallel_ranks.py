"""Rank functions of test_parallel.py (run by tests.multirank.run_ranks on real gloo ranks).

Weights are non-degenerate on purpose, so that the parity bounds can fail for the bugs they
guard against (RoPE dropped, a wrong rope theta or RMSNorm epsilon, a x2 gradient):
- norm weights 1 + N(0, 0.1): a norm that ignores its weight, or one computed with the
  wrong epsilon, shows;
- the embedding rows are small (std 0.02, like released checkpoints), so the first norm's
  epsilon is a visible fraction of the mean square;
- q/k projections have std 0.3: attention scores have a std of ~6, the softmax is peaked
  and the result depends on every relative position (RoPE) rather than averaging it away.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

TEXT_V, IMG_V, IMG_T = 512, 256, 320
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
ROPE_THETA, NORM_EPS = 10000.0, 1e-6
SEQ = 128          # parity and training sequences
MBS, NMB = 2, 4    # micro-batch size, micro-batches per step (split over DP ranks)
STEPS = 3          # Adam's first step is ~lr*sign(g): several steps make a x2 gradient visible
LR = 1e-3
# Adam with eps=1e-8 is ill-conditioned for a layout comparison: an element whose gradient is
# below the fp32 reduction noise (~1e-5 relative here) flips sign between layouts and its update
# by 2*lr (measured: 1.2e-3 max weight difference after 3 steps at TP2). With eps=1e-4, still
# below most clipped gradient elements (so Adam stays non-linear), the same runs differ by
# 4.7e-5, and a x2 gradient on one norm weight moves the weights by 9e-4.
ADAM_EPS = 1e-4


# ---- the reference model and data ------------------------------------------------------------
def hf_model(seed: int = 0):
    """transformers' Qwen2ForCausalLM (eager attention, fp32) with non-degenerate weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=TEXT_V, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=4 * SEQ, rope_theta=ROPE_THETA, rms_norm_eps=NORM_EPS,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 0.02)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # v/o/gate/up/down projections and lm_head: ~unit gain
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return model


def text_batches(seed: int = 1, n: int = 2) -> list[dict]:
    """Text-only micro-batches (Qwen2 has no image tokens) with a random loss mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, TEXT_V, (MBS, SEQ + 1), generator=g)
        out.append(_batch(seq, g))
    return out


def mixed_batches(step: int) -> list[dict]:
    """NMB micro-batches of alternating text / image segments of odd lengths."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(NMB):
        text = torch.randint(0, TEXT_V, (MBS, SEQ + 1), generator=g)
        image = TEXT_V + torch.randint(0, IMG_V, (MBS, SEQ + 1), generator=g)
        seq = torch.where(torch.arange(SEQ + 1) % 23 >= 7, image, text)
        out.append(_batch(seq, g))
    return out


def _batch(seq: torch.Tensor, g: torch.Generator) -> dict:
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "loss_mask": (torch.rand(MBS, SEQ, generator=g) > 0.2).float(),
        "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous(),
    }


def hf_labels(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for transformers' shifted causal-LM loss with the same mask:
    HF predicts labels[t + 1] at position t, and ignores -100."""
    ids = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
    labels = ids.clone()
    labels[:, 1:][batch["loss_mask"] == 0] = -100
    labels[:, 0] = -100
    return ids, labels


def attention_peakedness(hf, tokens: torch.Tensor) -> float:
    """Mean (over layers, heads, queries past the first 16) of the largest attention weight."""
    with torch.no_grad():
        att = hf(tokens, output_attentions=True).attentions
    return torch.stack([a[:, :, 16:].amax(-1).mean() for a in att]).mean().item()


# ---- megatron side ------------------------------------------------------------------------
def _load_chunks(ckpt_root, layout: dict, mcfg_overrides: dict | None = None):
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    par = ParallelConfig(**layout)
    pg = initialize_parallel(par, seed=7)
    path = resolve_checkpoint(ckpt_root)
    mcfg = XOmniModelConfig.from_dict({**read_metadata(path, "model_config"), **(mcfg_overrides or {})})
    chunks = build_model_chunks(mcfg, par, pg)
    load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks)))
    return chunks, pg, mcfg


def _unwrap(m):
    return m.module if hasattr(m, "module") and not hasattr(m, "model_cfg") else m


def _reset_layout() -> None:
    """Drop megatron-core's groups (keep the default group) so another layout can start."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _save_grads(root, chunks) -> None:
    """Save every parameter's reduced gradient (main_grad) as a dist-ckpt of the model:
    loading it at TP1/PP1 gives the global gradient of each parameter, whatever the layout."""
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.training.step import model_sharded_state_dict

    params = [p for c in chunks for p in _unwrap(c).parameters()]
    kept = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.view_as(p)
        save_checkpoint(root, 0, model_sharded_state_dict(chunks))
    finally:
        for p, d in zip(params, kept):
            p.data = d


def megatron_vs_hf(rank, world, root, mcfg_overrides=None, patch_rope_off=False):
    """HF parity at TP1: logits, training loss (labels= with the same mask) and gradients.

    Returns max abs differences (logits, loss) and the largest per-parameter relative gradient
    difference. `mcfg_overrides` / `patch_rope_off` deliberately break the Megatron side (used
    to show that the bounds fail for those bugs)."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rpe

    orig = rpe.RotaryEmbedding.forward
    if patch_rope_off:
        rpe.RotaryEmbedding.forward = lambda self, *a, **k: orig(self, *a, **k) * 0  # angle 0: identity
    try:
        return _megatron_vs_hf(Path(root), mcfg_overrides)
    finally:
        rpe.RotaryEmbedding.forward = orig


def _megatron_vs_hf(root: Path, mcfg_overrides) -> dict:
    from megatron_xomni.conversion.convert import megatron_state_to_hf
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer, zero_grads
    from megatron_xomni.training.step import forward_backward, forward_logits

    hf = hf_model()
    chunks, pg, mcfg = _load_chunks(root / "mg", {}, mcfg_overrides)
    batches = text_batches()

    for c in chunks:
        c.eval()
    logits = forward_logits(chunks, batches, pg)
    with torch.no_grad():
        ref_logits = [hf(b["tokens"]).logits for b in batches]
    logit_diff = max((m[..., :TEXT_V] - r).abs().max().item() for m, r in zip(logits, ref_logits))

    # Training loss and gradients through the training path (megatron DDP + schedule).
    wrapped, opt = wrap_and_build_optimizer(chunks, OptimConfig(lr=LR), pg)
    for m in wrapped:
        m.train()
    zero_grads(wrapped, opt)
    loss = forward_backward(wrapped, batches, TEXT_V, pg)["loss"]
    all_ids, all_labels = zip(*(hf_labels(b) for b in batches))
    with torch.no_grad():  # token-weighted mean over the whole step, as reported
        ref_loss = hf(torch.cat(all_ids), labels=torch.cat(all_labels)).loss.item()
    # The schedule's gradient is the mean over micro-batches of each micro-batch's token mean.
    hf.zero_grad()
    (sum(hf(i, labels=lab).loss for i, lab in zip(all_ids, all_labels)) / len(batches)).backward()
    grads = {n: p.main_grad.detach().clone() for n, p in _unwrap(chunks[0]).named_parameters()}
    hf_params = dict(hf.named_parameters())
    grad_rel = {}
    for name, g in megatron_state_to_hf(grads, mcfg, "qwen2"):
        ref = hf_params[name].grad
        grad_rel[name] = ((g - ref).abs().max() / ref.abs().max()).item()
    return {
        "logits": logit_diff, "logit_scale": max(r.abs().max().item() for r in ref_logits),
        "loss": abs(loss - ref_loss), "ref_loss": ref_loss, "grad_rel": grad_rel,
        "peakedness": attention_peakedness(hf, batches[0]["tokens"]),
    }


def prepare(rank, world, root):
    """HF model -> Megatron checkpoint `mg` (conversion), and `mg_train`: the same with the
    vision blocks' zero-initialised output projections randomised, so gradients flow through
    every weight from the first step of the layout tests."""
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.conversion.convert import convert_hf_to_megatron
    from megatron_xomni.training.step import model_sharded_state_dict

    root = Path(root)
    hf_model().save_pretrained(root / "hf", safe_serialization=True)
    convert_hf_to_megatron(root / "hf", root / "mg", vision_layers=(1, 1), image_vocab_size=IMG_V,
                           image_table_size=IMG_T)
    chunks, pg, mcfg = _load_chunks(root / "mg", {})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")) and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    save_checkpoint(root / "mg_train", 0, model_sharded_state_dict(chunks), {"model_config": mcfg.to_dict()})
    _reset_layout()


def train_layout(root, name: str, layout: dict, distopt: bool = False, overlap: bool = False) -> dict:
    """STEPS optimizer steps at one layout from `mg_train`. Saves the gradients of step 1
    (before the optimizer touches them) to grads_<name> and the final weights to out_<name>.
    Returns the text-only logits (last stage), per-step losses, grad norms and `ok` flags."""
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer, zero_grads
    from megatron_xomni.training.step import forward_backward, forward_logits, model_sharded_state_dict

    root = Path(root)
    chunks, pg, mcfg = _load_chunks(root / "mg_train", layout)
    for c in chunks:
        c.eval()
    logits = forward_logits(chunks, text_batches(), pg)
    wrapped, opt = wrap_and_build_optimizer(
        chunks, OptimConfig(lr=LR, adam_eps=ADAM_EPS, use_distributed_optimizer=distopt,
                            overlap_grad_reduce=overlap), pg)
    for m in wrapped:
        m.train()
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    losses, norms, oks = [], [], []
    for step in range(STEPS):
        batches = mixed_batches(step)
        per = len(batches) // dp
        zero_grads(wrapped, opt)
        losses.append(forward_backward(wrapped, batches[dp_rank * per:(dp_rank + 1) * per], TEXT_V, pg)["loss"])
        if step == 0 and not distopt:  # distopt: each rank holds only its shard of the reduced grads
            _save_grads(root / f"grads_{name}", chunks)
        ok, grad_norm, _ = opt.step()
        oks.append(ok)
        norms.append(grad_norm)
    save_checkpoint(root / f"out_{name}", STEPS, model_sharded_state_dict(chunks), {"model_config": mcfg.to_dict()})
    result = {"logits": [x[..., :TEXT_V] for x in logits] or None, "loss": losses, "grad_norm": norms, "ok": oks}
    del wrapped, opt, chunks
    _reset_layout()
    return result


def _global_state(ckpt_root) -> dict:
    """Every tensor of a model dist-ckpt at TP1/PP1 (collective over the current ranks)."""
    from megatron_xomni.checkpointing import load_checkpoint, resolve_checkpoint
    from megatron_xomni.conversion.convert import _plain_state

    chunks, pg, mcfg = _load_chunks(Path(ckpt_root).parent / "mg_train", {})
    loaded = load_checkpoint(resolve_checkpoint(ckpt_root), {"model": chunks[0].sharded_state_dict()})
    chunks[0].load_state_dict(loaded["model"], strict=False)
    state = _plain_state(chunks[0])
    _reset_layout()
    return state


def compare_to_reference(root, names) -> dict:
    """{name: (max weight diff after STEPS, max per-tensor |dw - dw_ref| / |dw_ref| of the
    updates, max per-parameter relative grad diff at step 1 or None)}."""
    root = Path(root)
    ref_w, ref_g = _global_state(root / "out_ref"), _global_state(root / "grads_ref")
    w0 = _global_state(root / "mg_train")
    out = {}
    for name in names:
        w = _global_state(root / f"out_{name}")
        wdiff = _max_diff(w, ref_w)
        upd = max(((w[k] - ref_w[k]).norm() / (ref_w[k] - w0[k]).norm().clamp(min=1e-30)).item() for k in ref_w)
        gdiff = None
        if (root / f"grads_{name}").exists():
            g = _global_state(root / f"grads_{name}")
            gdiff = max(((g[k] - ref_g[k]).abs().max() / ref_g[k].abs().max().clamp(min=1e-30)).item()
                        for k in ref_g)
        out[name] = (wdiff, upd, gdiff)
    return out


def reference_rank(rank, world, root):
    """One rank: conversion, HF parity, and the TP1 training reference."""
    prepare(rank, world, root)
    parity = megatron_vs_hf(rank, world, root)
    _reset_layout()
    ref = train_layout(root, "ref", {})
    g = _global_state(Path(root) / "grads_ref")
    ref["grad_norm_formula"] = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))
    return {"parity": parity, "ref": ref}


def layouts_rank(rank, world, root, cases: dict, identical: tuple = ()):
    """Every case of one world size in one launch, then their comparison with the reference.
    `identical`: pairs of cases whose step-1 gradients and final weights must be bit-equal."""
    root = Path(root)
    results = {name: train_layout(root, name, layout, **opts) for name, (layout, opts) in cases.items()}
    diffs = compare_to_reference(root, list(cases))
    pairs = {}
    for a, b in identical:
        pairs[(a, b)] = max(_max_diff(_global_state(root / f"{kind}_{a}"), _global_state(root / f"{kind}_{b}"))
                            for kind in ("grads", "out"))
    return {"results": results, "diffs": diffs, "identical": pairs}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)
