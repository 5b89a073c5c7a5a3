"""Scalable fonts for the rendered-text skill.

The default is Pillow's bundled scalable font (``ImageFont.load_default(size=...)``, Pillow
>= 10.1).  It ships inside the Pillow wheel and is laid out with the BASIC engine, so the
same Pillow version renders byte-identical text on every machine; a system font such as
DejaVu would make the data depend on what the host has installed.  A TrueType path can be
given instead (``WorldConfig.font_path``).
"""

from __future__ import annotations

import functools
import os

from PIL import ImageFont


@functools.lru_cache(maxsize=256)
def get_font(size: int, path: str | None = None) -> ImageFont.FreeTypeFont:
    """Return a scalable font at ``size`` pixels (cached: fitting text tries many sizes)."""
    if size < 1:
        raise ValueError(f"font size must be >= 1 pixel, got {size}")
    if path is None:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise ValueError(
                "Pillow was built without FreeType, so it has no scalable default font; "
                "install a Pillow wheel with FreeType or set WorldConfig.font_path to a .ttf file"
            )
        return font
    if not os.path.isfile(path):
        raise ValueError(f"font file {path!r} does not exist; set WorldConfig.font_path to a .ttf file or None")
    return ImageFont.truetype(path, size=size, layout_engine=ImageFont.Layout.BASIC)
