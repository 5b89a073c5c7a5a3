"""Declarative HF <-> Megatron name mappings with explicit fused-tensor rules.

Megatron names are those of a TP=1, PP=1 `XOmniModel.state_dict()` (local spec); megatron-core's
distributed checkpointing then reshards them to any TP/PP layout. Two fused rules exist:

- `qkv`: megatron's `linear_qkv` stores rows grouped by KV head:
  [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...] (weights and biases alike).
- `gate_up`: megatron's `linear_fc1` is cat([gate_proj, up_proj]) along the output dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_xomni.models.xomni.config import XOmniModelConfig

# Per-layer rules: megatron suffix, HF suffix(es), fuse kind.
LAYER_RULES: list[tuple[str, tuple[str, ...], str]] = [
    ("input_layernorm.weight", ("input_layernorm.weight",), "direct"),
    ("self_attention.linear_qkv.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "direct"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "direct"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "direct"),
]

# Whole-model rules per HF layout: megatron name -> HF name (None: not in that layout).
QWEN2_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.text_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
XOMNI_GLOBAL = {
    "embedding.word_embeddings.weight": "model.lm_embed_tokens.weight",
    "image_embedding.word_embeddings.weight": "model.mm_embed_tokens.weight",
    "decoder.final_layernorm.text_norm.weight": "model.lm_norm.weight",
    "decoder.final_layernorm.image_norm.weight": "model.mm_norm.weight",
    "output_layer.weight": "lm_head.weight",
    "image_output_layer.weight": "mm_head.weight",
}


@dataclass(frozen=True)
class Layout:
    """An HF layout: its whole-model names and how megatron layer i maps to an HF layer."""

    name: str
    global_names: dict
    hf_layer: Callable[[XOmniModelConfig, int], Optional[int]]


def _qwen2_layer(cfg: XOmniModelConfig, i: int) -> Optional[int]:
    j = i - cfg.num_vision_adapter_layers
    return j if 0 <= j < cfg.num_layers else None  # vision blocks do not exist in Qwen2


QWEN2 = Layout("qwen2", QWEN2_GLOBAL, _qwen2_layer)
XOMNI = Layout("xomni", XOMNI_GLOBAL, lambda cfg, i: i)


def fuse_qkv(q, k, v, cfg: XOmniModelConfig) -> torch.Tensor:
    g, d = cfg.num_query_groups, cfg.kv_channels
    rest = q.shape[1:]
    q = q.reshape(g, -1, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv, cfg: XOmniModelConfig):
    g, d = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // g * d
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, per_group + 2 * d, *rest)
    q, k, v = torch.split(grouped, [per_group, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse(kind: str, tensors: list[torch.Tensor], cfg: XOmniModelConfig) -> torch.Tensor:
    if kind == "direct":
        return tensors[0]
    if kind == "qkv":
        return fuse_qkv(*tensors, cfg)
    if kind == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(kind)


def unfuse(kind: str, tensor: torch.Tensor, cfg: XOmniModelConfig) -> list[torch.Tensor]:
    if kind == "direct":
        return [tensor]
    if kind == "qkv":
        return list(split_qkv(tensor, cfg))
    if kind == "gate_up":
        return list(torch.chunk(tensor, 2, dim=0))
    raise ValueError(kind)


def megatron_to_hf_names(cfg: XOmniModelConfig, layout: Layout):
    """Yield (megatron_name, [hf_names], fuse_kind) for every tensor the layout holds."""
    for mname, hname in layout.global_names.items():
        yield mname, [hname], "direct"
    for i in range(cfg.num_layers_total):
        j = layout.hf_layer(cfg, i)
        if j is None:
            continue
        for msuffix, hsuffixes, kind in LAYER_RULES:
            yield f"decoder.layers.{i}.{msuffix}", [f"model.layers.{j}.{s}" for s in hsuffixes], kind
