"""Configuration of the SigLIP-VQ semantic image tokenizer (X-Omni section 1)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POS_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")


@dataclass
class SigLIPVQConfig:
    """SigLIP ViT encoder + index-backprop VQ + conv adapter.

    Encoder fields mirror `transformers.SiglipVisionConfig`; `pos_grid` replaces its
    `image_size` (the learned position table is a `pos_grid x pos_grid` square grid).
    """

    # --- encoder (SigLIP ViT) ---
    patch_size: int = 16
    """Side of the square patches, in pixels; images must be multiples of it."""
    width: int = 1536
    """Encoder hidden size."""
    num_layers: int = 40
    """Number of transformer blocks; features come from the last one, before post_layernorm."""
    num_heads: int = 16
    """Attention heads per block."""
    mlp_dim: int = 6144
    """Hidden size of each block's MLP."""
    num_channels: int = 3
    """Input image channels."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon inside the blocks (SigLIP uses 1e-6)."""
    hidden_act: str = "gelu_pytorch_tanh"
    """MLP activation, a `transformers` ACT2FN name (SigLIP uses tanh-approximate GELU)."""
    pos_grid: int = 128
    """Side of the learned position grid (X-Omni: built for 2048 px, i.e. 128x128)."""
    pos_resize_mode: str = "bilinear"
    """How the grid is resized to (H/p, W/p): a `torch.nn.functional.interpolate` mode.
    X-Omni uses bilinear; `transformers`' SigLIP `interpolate_pos_encoding` uses bicubic."""
    pos_resize_antialias: bool = False
    """Antialias when shrinking the grid (SigLIP2 naflex uses bilinear + antialias; the
    X-Omni setting is not disclosed (?), False keeps plain bilinear)."""
    attn_implementation: str = "sdpa"
    """`transformers` attention backend for the SigLIP blocks: "sdpa", "eager", "flash_attention_2"."""
    gradient_checkpointing: bool = False
    """Recompute each encoder block in backward to save activation memory."""
    freeze_encoder: bool = False
    """Keep the ViT fixed (no grads, eval mode, run under no_grad) and train only VQ + adapter."""

    # --- quantizer ---
    codebook_size: int = 16384
    """Number of codes K."""
    codebook_dim: int = 2048
    """Code dimension D (the pre-quant 1x1 conv maps width -> D)."""
    quant_temperature: float = 2.0
    """tau of the training soft assignment softmax(-d / tau)."""
    commitment_beta: float = 0.25
    """Weight of the commitment term beta * ||z - sg(e)||^2."""
    skip_quant_prob: float = 0.1
    """Fraction of training samples (whole images) that bypass quantization."""
    search_chunk_size: int = 4096
    """Codes scored per block in the nearest-code search (rows are blocked too, so the score
    matrix stays <= 2^24 entries whatever the batch and codebook sizes)."""
    reseed_buffer_size: int = 8192
    """Recent (normalised) encoder features kept for dead-code re-seeding; 0 disables."""

    # --- adapter ---
    adapter_dim: int = 1536
    """Channels of the adapter output (the features the diffusion decoder consumes)."""
    adapter_num_blocks: int = 2
    """Residual conv blocks after the post-quant 1x1 conv."""
    adapter_kernel_size: int = 3
    """Spatial kernel of the residual blocks' convs (odd, 'same' padding)."""
    adapter_num_groups: int = 32
    """GroupNorm groups in the residual blocks (must divide adapter_dim)."""

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be divisible by num_heads={self.num_heads}")
        if self.pos_resize_mode not in POS_RESIZE_MODES:
            raise ValueError(f"pos_resize_mode={self.pos_resize_mode!r}: use one of {POS_RESIZE_MODES}")
        if self.adapter_dim % self.adapter_num_groups:
            raise ValueError(
                f"adapter_num_groups={self.adapter_num_groups} must divide adapter_dim={self.adapter_dim}"
            )
        if self.adapter_kernel_size % 2 == 0:
            raise ValueError(f"adapter_kernel_size={self.adapter_kernel_size} must be odd")
        if not 0.0 <= self.skip_quant_prob <= 1.0:
            raise ValueError(f"skip_quant_prob={self.skip_quant_prob} must lie in [0, 1]")
        if self.quant_temperature <= 0:
            raise ValueError(f"quant_temperature={self.quant_temperature} must be > 0")
        for name in ("patch_size", "pos_grid", "codebook_size", "codebook_dim", "search_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table."""
        return self.pos_grid * self.pos_grid

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SigLIPVQConfig":
        from megatron_xomni.dataclass_utils import strict_from_dict

        return strict_from_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SigLIPVQConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


_PRESETS: dict[str, dict[str, Any]] = {
    # X-Omni: SigLIP2-giant (patch 16, 1536 wide, 40 blocks, 16 heads, MLP ratio 4), grid for 2048 px,
    # 16384 x 2048 codebook, adapter back to 1536.
    "xomni": dict(
        patch_size=16, width=1536, num_layers=40, num_heads=16, mlp_dim=6144, pos_grid=128,
        codebook_size=16384, codebook_dim=2048, adapter_dim=1536,
    ),
    # Trains on a CPU in seconds; GroupNorm groups shrink to fit the small adapter.
    "tiny": dict(
        patch_size=16, width=64, num_layers=2, num_heads=2, mlp_dim=128, pos_grid=8,
        codebook_size=256, codebook_dim=32, adapter_dim=64, adapter_num_groups=8,
        search_chunk_size=128, reseed_buffer_size=1024,
    ),
}


def tokenizer_config(name: str, **overrides: Any) -> SigLIPVQConfig:
    """A named preset ("xomni" or "tiny"), with any field overridden by keyword."""
    if name not in _PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(_PRESETS)}")
    return SigLIPVQConfig(**{**_PRESETS[name], **overrides})
