"""Layer specs for the X-Omni stack: Transformer Engine where it can run, local elsewhere."""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_xomni.device import transformer_engine_usable  # also re-exported for old callers
from megatron_xomni.models.xomni.attention import SDPAttention
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.models.xomni.layers import XOmniFinalNorm, XOmniVisionLayer
from megatron_xomni.models.xomni.norm import RMSNorm


def _layer_spec(use_te: bool) -> tuple[ModuleSpec, type]:
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return specs.get_gpt_layer_with_transformer_engine_spec(), TENorm
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=SDPAttention))
    sub = dataclasses.replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                              self_attention=attn)
    return dataclasses.replace(spec, submodules=sub), RMSNorm


def xomni_block_spec(
    model_cfg: XOmniModelConfig, config, vp_stage: int | None = None, pp_rank: int | None = None,
    use_te: bool | None = None,
) -> TransformerBlockSubmodules:
    """Block spec for the layers this pipeline stage (and virtual stage) builds."""
    use_te = transformer_engine_usable() if use_te is None else use_te
    layer, norm_cls = _layer_spec(use_te)
    vision = dataclasses.replace(layer, module=XOmniVisionLayer)
    all_layers = [
        vision if model_cfg.is_vision_layer(i) else layer for i in range(model_cfg.num_layers_total)
    ]
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=all_layers[offset : offset + count],
        layer_norm=ModuleSpec(module=XOmniFinalNorm, params={"norm_cls": norm_cls}),
    )
