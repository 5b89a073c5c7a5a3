"""Small real HF checkpoints for the conversion tests, written from transformers' own Qwen2 classes.

Weights are non-degenerate: RMSNorm weights near 1 and projections large enough that attention is
peaked, so a wrong RoPE, norm or head mapping moves the logits far beyond float32 round-off.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def write_qwen(path, *, vocab: int = 300, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 96, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 1,
               shards: int = 1, max_positions: int = 256):
    """Save a random Qwen2ForCausalLM to `path` (safetensors, `shards` files); returns it as transformers
    loads it back (float32, eager attention, eval)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                      rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=max_positions)
    cfg._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            else:  # ~3x the 1/sqrt(fan_in) scale: peaked attention, large residual updates, logits ~N(0, 9)
                p.copy_(noise * 3 / p.shape[-1] ** 0.5)
    model = model.to(dtype).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=f"{size // shards // 1000 + 1}KB")
    # The reference is what transformers loads from the files (float32; RoPE buffers never rounded).
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
