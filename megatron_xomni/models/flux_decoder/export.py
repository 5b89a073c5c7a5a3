"""The decoder's diffusers-format export (collective under FSDP2: rank 0 writes)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from megatron_xomni.models.flux_decoder.model import XOmniDecoder, transformer_from_config


def full_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call it; rank 0 gets the values)."""
    return get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_decoder(decoder: XOmniDecoder, out: str | Path) -> Path:
    """Write the decoder in diffusers format to `out` (what XOmniDecoder.from_pretrained reads)."""
    sd = full_state(decoder.transformer)
    out = Path(out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        plain = transformer_from_config(decoder.cfg)  # an unsharded twin to call save_pretrained on
        plain.load_state_dict(sd, strict=True)
        XOmniDecoder(decoder.cfg, plain, decoder.vae, decoder.prompt_encoder).save_pretrained(out)
    if dist.is_initialized():
        dist.barrier()
    return out
