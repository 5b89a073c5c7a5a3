"""Pixels <-> image-token grid: one image token covers `patch` x `patch` pixels.

    grid = ImageGrid.from_pixels(384, 256, patch=tokenizer.cfg.patch_size)   # 24 rows x 16 cols
    grid.rows, grid.cols, grid.num_tokens, grid.shape                        # 24, 16, 384, (24, 16)
    grid.height, grid.width                                                  # 384, 256

The patch is always the image tokenizer's (SigLIP-VQ `patch_size`); nothing else may assume a
size. The X-Omni sequence header `<SOM>{rows} {cols}<IMAGE>` and the decoder's latent grid are both
this grid. A size that is not a positive multiple of the patch is a one-line ValueError that names
the nearest size that works.
"""
from __future__ import annotations

from dataclasses import dataclass


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
