"""Core attention for the local (non-Transformer-Engine) spec through torch SDPA.

megatron-core's local `DotProductAttention` materialises fp32 scores with baddbmm, masks and
softmaxes them, then bmm's the values. `torch.nn.functional.scaled_dot_product_attention` runs a
fused (flash-style) kernel on CPU and GPU alike and supports GQA without repeating K/V. The
mask semantics follow megatron-core: `attention_mask` True means "masked out"; with no mask,
the causal type means causal when query and key lengths match, and "see everything" for a
single decode query (KV-cache inference), exactly as megatron's softmax does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed THD sequences/attention bias need Transformer Engine attention: "
                             "pass a block-diagonal attention_mask on the local spec instead")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal, mask = False, None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:  # chunked prefill after a cache: bottom-right aligned causal mask
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        groups = q.shape[1] // k.shape[1]
        p = self.attention_dropout.p if self.training else 0.0
        if not self.config.sequence_parallel and p > 0:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=groups > 1)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=groups > 1)
        # [b, h, sq, d] -> [sq, b, h*d]
        return ctx.permute(2, 0, 1, 3).reshape(sq, ctx.shape[0], -1)
