"""RMSNorm for the local (pure PyTorch) layer spec.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism, and its grad all-reduce for
norm weights under SP keys on a `sequence_parallel` attribute that Transformer Engine's norms
set. This module computes exactly what `transformers`' Qwen2RMSNorm computes (fp32 statistics,
weight applied in the input dtype), so parity with the HF model is bit-level in fp32.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under SP each TP rank sees different tokens: gradients must be all-reduced over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
