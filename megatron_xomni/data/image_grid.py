"""Pixels <-> image-token grid: one image token covers `patch` x `patch` pixels.

    grid = ImageGrid.from_pixels(384, 256, patch=tokenizer.cfg.patch_size)   # 24 rows x 16 cols
    grid.rows, grid.cols, grid.num_tokens, grid.shape                        # 24, 16, 384, (24, 16)
    grid.height, grid.width                                                  # 384, 256

The patch is always the image tokenizer's (SigLIP-VQ `patch_size`); nothing else may assume a
size. The X-Omni sequence header `<SOM>{rows} {cols}<IMAGE>` and the decoder's latent grid are both
this grid. A size that is not a positive multiple of the patch is a one-line ValueError that names
the nearest size that works.

A consumer with a coarser token (the FLUX decoder: 16 px) reads a finer code grid through `fold`:

    dgrid = grid.fold(2)                       # 8x8 codes of 8 px -> 4x4 decoder tokens of 16 px
    feats = fold_tokens(feats, grid, 2)        # [B, 64, C] -> [B, 16, 4C]: each 2x2 block concatenated
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def nearest_multiple(side: int, patch: int) -> int:
    """The positive multiple of `patch` closest to `side` (ties to the even multiple, as Python rounds)."""
    return max(patch, round(side / patch) * patch)


@dataclass(frozen=True)
class ImageGrid:
    """The token grid of one image size."""

    rows: int
    """Tokens per column (image height / patch)."""
    cols: int
    """Tokens per row (image width / patch)."""
    patch: int
    """Pixels per token side (the image tokenizer's patch size)."""

    @classmethod
    def from_pixels(cls, height: int, width: int, patch: int, what: str = "image size") -> "ImageGrid":
        """The grid of a `height` x `width` image; ValueError (one line) unless both are positive multiples
        of `patch`. `what` names the value in the message (e.g. "--size", "image_height x image_width")."""
        patch = int(patch)
        if patch < 1:
            raise ValueError(f"patch={patch} must be >= 1 (the image tokenizer's patch_size)")
        h, w = int(height), int(width)
        if h <= 0 or w <= 0 or h % patch or w % patch:
            raise ValueError(f"{what} {h}x{w} is not a multiple of the {patch}-pixel token grid: use e.g. "
                             f"{nearest_multiple(h, patch)}x{nearest_multiple(w, patch)}")
        return cls(h // patch, w // patch, patch)

    @classmethod
    def from_tokens(cls, rows: int, cols: int, patch: int) -> "ImageGrid":
        """The grid of `rows` x `cols` tokens (e.g. the shape of a codes array)."""
        rows, cols, patch = int(rows), int(cols), int(patch)
        if rows < 1 or cols < 1 or patch < 1:
            raise ValueError(f"token grid {rows}x{cols} (patch {patch}) must be positive")
        return cls(rows, cols, patch)

    def fold(self, k: int) -> "ImageGrid":
        """The grid whose tokens are k x k blocks of this one's (patch * k); ValueError unless k divides both sides."""
        k = int(k)
        if k < 1 or self.rows % k or self.cols % k:
            raise ValueError(f"cannot fold the {self.rows}x{self.cols} token grid into {k}x{k} blocks: the image "
                             f"must be a multiple of {self.patch * max(k, 1)} px")
        return ImageGrid(self.rows // k, self.cols // k, self.patch * k)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols), the shape of the codes array."""
        return self.rows, self.cols

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.rows * self.patch

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.cols * self.patch


def fold_tokens(tokens: torch.Tensor, grid: ImageGrid, k: int) -> torch.Tensor:
    """[B, rows*cols, C] raster-order tokens of `grid` -> [B, (rows/k)*(cols/k), k*k*C] on grid.fold(k):
    each k x k block's features concatenated in raster order within the block (k = 1: unchanged)."""
    coarse = grid.fold(k)
    if k == 1:
        return tokens
    b, n, c = tokens.shape
    if n != grid.num_tokens:
        raise ValueError(f"{n} tokens do not fill the {grid.rows}x{grid.cols} grid")
    x = tokens.reshape(b, coarse.rows, k, coarse.cols, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, coarse.num_tokens, k * k * c)
