"""Shared tiny builders for the decoder tests (no tokenizer needed: features are random)."""
from __future__ import annotations

import pytest
import torch

from megatron_xomni.device import torch_threads as threads

ADAPTER_DIM = 24  # deliberately not the tiny tokenizer's width: the decoder must not assume it


@pytest.fixture(autouse=True)
def _threads():
    # 2 cores shared with other jobs: one thread is fastest under contention (measured 10-60x).
    with threads(1):
        yield


def tiny_cfg(variant: str = "image", **overrides):
    from megatron_xomni.models.flux_decoder import decoder_config

    return decoder_config("tiny", variant, adapter_dim=ADAPTER_DIM, **overrides)


def tiny_decoder(variant: str = "image", seed: int = 0, **overrides):
    """A random tiny decoder whose semantic projection (and pooled embedding) are made non-zero,
    so tests exercise the conditioning path rather than a no-op."""
    from megatron_xomni.models.flux_decoder import build_decoder

    dec = build_decoder(tiny_cfg(variant, **overrides), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        t = dec.transformer
        t.semantic_proj.weight.copy_(torch.randn(t.semantic_proj.weight.shape, generator=g) * 0.2)
        if t.pooled_embedding is not None:
            t.pooled_embedding.copy_(torch.randn(t.pooled_embedding.shape, generator=g))
    return dec.eval()


def random_features(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h * w, ADAPTER_DIM, generator=torch.Generator().manual_seed(seed))
