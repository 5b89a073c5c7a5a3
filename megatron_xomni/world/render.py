"""Rasterise world scenes with Pillow.

Everything is drawn at ``supersample`` times the target size and box-averaged down
(``Image.reduce``): edges come out anti-aliased like a photo, while every pixel fully inside
a shape keeps its exact palette colour (an average of identical values), which is what lets
tests check ground-truth boxes against pixels exactly.

Boxes are ``[x0, y0, x1, y1]`` in output pixels, x1/y1 exclusive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from megatron_xomni.world.fonts import get_font
from megatron_xomni.world.vocab import SHAPES

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], scale: int, fill) -> None:
    """Draw ``shape`` filling ``box`` (output pixels, may be fractional) on a canvas
    ``scale`` times larger than the output."""
    x0, y0 = box[0] * scale, box[1] * scale
    # Pillow's coordinates are inclusive, so the last covered sub-pixel is x1*scale - 1.
    x1, y1 = box[2] * scale - 1, box[3] * scale - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom edge of the box
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":  # a square standing on a corner, touching all four box edges
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_coverage(shape: str, box: Sequence[float], width: int, height: int, supersample: int = 4) -> np.ndarray:
    """Float (height, width) map of the fraction of each pixel that ``shape`` covers when it
    fills ``box`` (fractional output-pixel coordinates) -- the detector's templates."""
    canvas = Image.new("L", (width * supersample, height * supersample), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, box, supersample, 255)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """How a piece of text is set: wrapped lines, font size and the size of its layout box."""

    lines: tuple[str, ...]  # the text broken into lines (joined with "\n" to draw)
    font_px: int  # font size in output pixels
    width: int  # width of the text's layout box (glyph advances) in output pixels, rounded up
    height: int  # height of the text's layout box (ascender to descender) in output pixels, rounded up


def _spacing(font_px: int, supersample: int) -> int:
    """Line spacing at the supersampled scale: a fifth of the font size."""
    return max(1, (font_px * supersample) // 5)


def _measure(lines: Sequence[str], font_px: int, font_path: str | None, supersample: int) -> tuple[int, int, int, int]:
    """Layout box of ``lines`` at the supersampled scale, drawn at the origin (Pillow's
    textbbox: glyph advances horizontally, so it contains the ink)."""
    font = get_font(font_px * supersample, font_path)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    return probe.multiline_textbbox((0, 0), "\n".join(lines), font=font, spacing=_spacing(font_px, supersample), align="center")


def _wrap(words: Sequence[str], max_width: float, font_px: int, font_path: str | None, supersample: int) -> list[str]:
    """Greedy word wrap: put as many words on a line as fit in ``max_width`` (supersampled px)."""
    font = get_font(font_px * supersample, font_path)
    lines: list[str] = []
    for word in words:
        if lines and font.getlength(lines[-1] + " " + word) <= max_width:
            lines[-1] = lines[-1] + " " + word
        else:
            lines.append(word)
    return lines


def fit_text(
    words: Sequence[str],
    max_width: int,
    max_height: int,
    max_font_px: int,
    min_font_px: int,
    font_path: str | None = None,
    supersample: int = 4,
) -> TextLayout | None:
    """Largest font size in [min_font_px, max_font_px] at which the wrapped words fit.

    Returns None when the words do not fit even at ``min_font_px`` (the caller then
    drops words), so that text is never rendered too small to read.
    """
    for font_px in range(max_font_px, min_font_px - 1, -1):
        lines = _wrap(words, max_width * supersample, font_px, font_path, supersample)
        left, top, right, bottom = _measure(lines, font_px, font_path, supersample)
        width = math.ceil((right - left) / supersample)
        height = math.ceil((bottom - top) / supersample)
        if width <= max_width and height <= max_height:
            return TextLayout(tuple(lines), font_px, width, height)
    return None


def render_scene(
    width: int,
    height: int,
    background: RGB,
    objects: Sequence[tuple[str, RGB, Box]],
    text: tuple[TextLayout, tuple[int, int], RGB] | None = None,
    font_path: str | None = None,
    supersample: int = 4,
) -> Image.Image:
    """Draw ``objects`` (shape, rgb, box) and optional text (layout, top-left, rgb).

    Returns an RGB image of exactly (width, height).
    """
    scale = supersample
    canvas = Image.new("RGB", (width * scale, height * scale), tuple(background))
    draw = ImageDraw.Draw(canvas)
    for shape, rgb, box in objects:
        draw_shape(draw, shape, box, scale, tuple(rgb))
    if text is not None:
        layout, (x, y), rgb = text
        font = get_font(layout.font_px * scale, font_path)
        spacing = _spacing(layout.font_px, scale)
        left, top, _, _ = _measure(layout.lines, layout.font_px, font_path, scale)
        # Shift by the box offset so the layout box starts exactly at (x, y).
        draw.multiline_text(
            (x * scale - left, y * scale - top), "\n".join(layout.lines), fill=tuple(rgb), font=font, spacing=spacing,
            align="center",
        )
    return canvas.reduce(scale) if scale > 1 else canvas
