"""Tiny-preset auxiliary terms of SigLIP-VQ training (a tiny-preset choice, not X-Omni's).

X-Omni trains its tokenizer with the caption loss alone, starting from a pretrained SigLIP2 and a
pretrained LLM. The tiny preset has neither (a 2-block ViT, a warmed-up 2-layer teacher), and its codes
lost the world's colours at quantization: about 88 % of tokens are background and most codes go there
(issue 11, reference/tiny-tokenizer-probe.md). Measured on the tiny world (64 px, patch 8, 256 codes,
1000-1500 steps), each of these helped:

- `pixel_weight`: a small conv head regresses the image's pixels from the *adapter features* (what the
  decoder reads), so the codes must keep colour and layout. Shuffled-image caption gap 0.6 % -> 41 %
  (weight 1) and object-token colour probe 0.28 -> 0.83; weight 4 with the two items below: gap ~99 %,
  colour 0.99, shape 0.90, count 0.99, position 0.94.
- `object_alpha`: each token's pixel error counts 1 + alpha * (its foreground fraction), so the few
  object tokens are not drowned by background (foreground = pixels far from the image's border median).
- re-seeding dead codes until ~80 % of the run (codebook.reseed_until): object tokens then use 115
  distinct codes instead of 48 (the probes barely move: colour 0.96 either way).

The head is discarded at export: downstream stages see only the tokenizer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PixelHead(nn.Module):
    """Adapter features [B, h*w, C] on an (h, w) grid -> pixels [B, 3, h*p, w*p] (3x3 convs + pixel shuffle)."""

    def __init__(self, in_dim: int, patch: int, width: int = 64) -> None:
        super().__init__()
        self.patch = patch
        self.body = nn.Sequential(nn.Conv2d(in_dim, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, 3 * patch * patch, 1))

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = feats.shape
        x = feats.transpose(1, 2).reshape(b, c, *grid)
        return F.pixel_shuffle(self.body(x), self.patch)


def foreground_fraction(pixels: torch.Tensor, patch: int, threshold: float = 0.3) -> torch.Tensor:
    """[B, h*w]: the fraction of each token's pixels that differ from the image's border median by more
    than `threshold` (L2 over RGB in [-1, 1]); the world's backgrounds are flat, its objects are not."""
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    fg = ((pixels - bg).norm(dim=1) > threshold).float()
    return F.avg_pool2d(fg[:, None], patch).flatten(1)


def weighted_pixel_error(pred: torch.Tensor, pixels: torch.Tensor, patch: int,
                         object_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted squared pixel errors, sum of weights): each pixel weighs its token's
    1 + object_alpha * foreground fraction. Kept apart so data-parallel ranks can divide by the global sum."""
    b, _, h, w = pixels.shape
    weight = 1 + object_alpha * foreground_fraction(pixels, patch)  # [B, h/p * w/p]
    weight = F.interpolate(weight.reshape(b, 1, h // patch, w // patch), scale_factor=patch, mode="nearest")[:, 0]
    err = (pred - pixels).pow(2).mean(1)
    return (err * weight).sum(), weight.sum()


def weighted_pixel_loss(pred: torch.Tensor, pixels: torch.Tensor, patch: int, object_alpha: float) -> torch.Tensor:
    """Weighted mean squared pixel error (see weighted_pixel_error)."""
    total, weight = weighted_pixel_error(pred, pixels, patch, object_alpha)
    return total / weight
