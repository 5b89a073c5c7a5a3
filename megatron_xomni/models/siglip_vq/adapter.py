"""Post-quantization adapter: 1x1 conv (codebook_dim -> adapter_dim) + residual conv blocks.

Its output (one adapter_dim vector per image token) is what the diffusion decoder consumes.
The convs see the 2D token grid, so neighbouring codes inform each token's feature.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig


class ResidualConvBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, channels: int, kernel_size: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return x + h


class ConvAdapter(nn.Module):
    """[B, h*w, codebook_dim] quantized codes -> [B, h*w, adapter_dim] features (raster order)."""

    def __init__(self, cfg: SigLIPVQConfig) -> None:
        super().__init__()
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.adapter_dim, 1)
        self.blocks = nn.Sequential(*[
            ResidualConvBlock(cfg.adapter_dim, cfg.adapter_kernel_size, cfg.adapter_num_groups)
            for _ in range(cfg.adapter_num_blocks)
        ])

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = grid
        if n != h * w:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
        x = x.transpose(1, 2).reshape(b, c, h, w)
        x = self.blocks(self.post_quant_conv(x))
        return x.flatten(2).transpose(1, 2)
