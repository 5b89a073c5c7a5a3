"""Seeded, index-addressable generator of captioned synthetic scenes (no download needed).

Each sample is a plain light background with either coloured shapes (GenEval-style skills:
single object, two objects, counting, colours, relative position, colour attributes) or
rendered text.  Every sample carries machine-readable ground truth (``meta``), a caption that
doubles as the generation prompt, and question/answer pairs for understanding training.

Reproducibility: all randomness comes from a ``random.Random`` seeded with a string built
from (stream, seed, index, skill, size).  String seeds go through SHA-512 inside ``random``,
so they do not depend on PYTHONHASHSEED, and any sample can be produced on its own (no need
to generate the ones before it).  Training uses the "train" stream; ``held_out_prompts``
uses the "heldout" stream, so the two never share a random stream even for equal seeds.

Meta (JSON-serialisable): "skill", "stream", "seed", "index", "width", "height",
"background" [r, g, b], "caption", "objects" [{"shape", "color", "rgb", "box"}] with boxes
[x0, y0, x1, y1) in pixels (the shape touches all four box edges), "include" (what the
prompt asks for, the detector's input: see ``megatron_xomni.world.detector``), "text"
(the exact rendered string, or None), and for the text skill also "text_box" (tight ink
box), "text_lines", "text_color" and "font_px".

Layout: objects are put in distinct cells of a small grid (chosen to fit the aspect ratio)
at a random size and position inside their cell, so they never overlap and keep a gap of
several pixels even at 64x64.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageChops

from megatron_xomni.world.render import TextLayout, fit_text, render_scene
from megatron_xomni.world.vocab import (
    COLORS,
    DEFAULT_BACKGROUND,
    DEFAULT_TEXT_COLOR,
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    SHAPES,
    SKILLS,
    TEXT_ADJECTIVES,
    TEXT_NOUNS,
    TEXT_VERBS,
    article,
    plural,
)

_SEED_PREFIX = "megatron-xomni-world"
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Object side as a fraction of the short image side, by number of objects in the scene.
_SIZE_RANGE = {1: (0.35, 0.55), 2: (0.25, 0.40), 3: (0.20, 0.30), 4: (0.20, 0.30)}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What the built-in data world may draw.  The defaults are the documented world."""

    shapes: tuple[str, ...] = SHAPES  # shapes that may appear (subset of vocab.SHAPES)
    colors: tuple[str, ...] = COLORS  # colour names that may appear (subset of vocab.PALETTE)
    skill_weights: tuple[float, ...] | None = None  # weight per SKILLS entry when skill=None; None = uniform
    background: tuple[int, int, int] = DEFAULT_BACKGROUND  # plain light background colour
    text_color: tuple[int, int, int] = DEFAULT_TEXT_COLOR  # colour of rendered text
    max_count: int = 4  # the counting skill draws 1..max_count objects (at most 4)
    min_object_px: int = 12  # smallest object side in pixels; below ~12 px shapes stop being recognisable
    supersample: int = 4  # draw at this many times the size and box-average down (anti-aliasing)
    font_path: str | None = None  # TrueType file for text; None = Pillow's bundled scalable font
    min_font_px: int = 10  # never render text smaller than this (drop words instead)
    max_words: int = 4  # the text skill draws 1..max_words words
    min_side: int = 48  # smallest accepted image side in pixels (4 objects of min_object_px must fit)
    max_aspect: float = 3.0  # largest accepted long/short side ratio

    def __post_init__(self) -> None:
        if not self.shapes or any(s not in SHAPES for s in self.shapes):
            raise ValueError(f"WorldConfig.shapes={self.shapes!r} must be a non-empty subset of {SHAPES}")
        if len(set(self.shapes)) < 2:
            raise ValueError("WorldConfig.shapes needs at least 2 distinct shapes (two-object skills pair different shapes)")
        if len(set(self.colors)) < 2 or any(c not in PALETTE for c in self.colors):
            raise ValueError(f"WorldConfig.colors={self.colors!r} must hold at least 2 names from {COLORS}")
        if self.skill_weights is not None:
            if len(self.skill_weights) != len(SKILLS) or any(w < 0 for w in self.skill_weights) or sum(self.skill_weights) <= 0:
                raise ValueError(f"WorldConfig.skill_weights needs {len(SKILLS)} non-negative weights (one per {SKILLS}) with a positive sum")
        if not 1 <= self.max_count <= max(NUMBER_WORDS):
            raise ValueError(f"WorldConfig.max_count={self.max_count} must be in 1..{max(NUMBER_WORDS)}")
        if self.min_object_px < 4 or self.supersample < 1 or self.min_font_px < 4 or self.max_words < 1:
            raise ValueError("WorldConfig needs min_object_px >= 4, supersample >= 1, min_font_px >= 4 and max_words >= 1")
        if self.min_side < 16 or self.max_aspect < 1:
            raise ValueError("WorldConfig needs min_side >= 16 and max_aspect >= 1")


@dataclasses.dataclass
class WorldSample:
    """One generated sample."""

    image: Image.Image  # RGB, exactly (width, height)
    caption: str  # natural prompt describing the image
    meta: dict[str, Any]  # JSON-serialisable ground truth (keys: see the module docstring)
    qa: list[tuple[str, str]]  # question/answer pairs about the image


def _rng(*parts: object) -> random.Random:
    return random.Random("|".join([_SEED_PREFIX, *map(str, parts)]))


def _check_size(height: int, width: int, config: WorldConfig) -> None:
    if not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(f"height and width must be ints, got {height!r} x {width!r}")
    if min(height, width) < config.min_side:
        raise ValueError(f"image {width}x{height} is too small: both sides must be >= {config.min_side} px (WorldConfig.min_side)")
    if max(height, width) / min(height, width) > config.max_aspect:
        raise ValueError(
            f"image {width}x{height} has aspect ratio {max(height, width) / min(height, width):.2f} > "
            f"{config.max_aspect} (WorldConfig.max_aspect); use a squarer size"
        )


# ----------------------------------------------------------------------------- layout
def _margins(width: int, height: int) -> tuple[int, int]:
    """(border margin, minimum gap between objects) in pixels for an image size."""
    short = min(width, height)
    return max(1, round(0.04 * short)), max(3, round(0.08 * short))


def _cells(width: int, height: int, cols: int, rows: int) -> list[tuple[int, int, int, int]]:
    """Grid cells over the image inside the border margin, padded so that objects in
    neighbouring cells stay at least one gap apart."""
    margin, gap = _margins(width, height)
    pad = math.ceil(gap / 2)
    xs = [margin + round(i * (width - 2 * margin) / cols) for i in range(cols + 1)]
    ys = [margin + round(j * (height - 2 * margin) / rows) for j in range(rows + 1)]
    return [
        (xs[i] + pad, ys[j] + pad, xs[i + 1] - pad, ys[j + 1] - pad) for j in range(rows) for i in range(cols)
    ]


def _grid_options(n: int, width: int, height: int, min_px: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with room for n objects of at least ``min_px``."""
    options = []
    for cols in range(1, 5):
        for rows in range(1, 5):
            if not n <= cols * rows <= (1 if n == 1 else n + 2):
                continue
            x0, y0, x1, y1 = _cells(width, height, cols, rows)[0]
            if min(x1 - x0, y1 - y0) >= min_px:
                options.append((cols, rows))
    return options


def _object_size(rng: random.Random, n: int, short: int, limit: int, min_px: int) -> int:
    lo, hi = _SIZE_RANGE[n]
    lo_px = max(min_px, round(lo * short))
    hi_px = max(lo_px, round(hi * short))
    return min(rng.randint(lo_px, hi_px), limit)


def _place_in(rng: random.Random, cell: tuple[int, int, int, int], size: int) -> list[int]:
    x0, y0, x1, y1 = cell
    x = rng.randint(x0, x1 - size)
    y = rng.randint(y0, y1 - size)
    return [x, y, x + size, y + size]


def _layout(rng: random.Random, n: int, width: int, height: int, config: WorldConfig) -> list[list[int]]:
    """Boxes for n non-overlapping objects, in random cells of a random fitting grid."""
    options = _grid_options(n, width, height, config.min_object_px)
    if not options:
        raise ValueError(
            f"{n} objects of >= {config.min_object_px} px do not fit in a {width}x{height} image; "
            "use a larger image or lower WorldConfig.min_object_px"
        )
    cols, rows = rng.choice(options)
    cells = rng.sample(_cells(width, height, cols, rows), n)
    boxes = []
    for cell in cells:
        limit = min(cell[2] - cell[0], cell[3] - cell[1])
        boxes.append(_place_in(rng, cell, _object_size(rng, n, min(width, height), limit, config.min_object_px)))
    return boxes


def _relation_layout(rng: random.Random, relation: str, width: int, height: int, config: WorldConfig) -> list[list[int]]:
    """Boxes [subject, reference] such that the subject is clearly ``relation`` the reference:
    separated along the relation's axis and offset by at most half as much across it."""
    horizontal = relation in ("left of", "right of")
    cols, rows = (2, 1) if horizontal else (1, 2)
    cells = _cells(width, height, cols, rows)
    limit = min(cells[0][2] - cells[0][0], cells[0][3] - cells[0][1])
    if limit < config.min_object_px:
        raise ValueError(f"two objects side by side do not fit in a {width}x{height} image; use a larger image")
    first, second = (0, 1) if relation in ("left of", "above") else (1, 0)
    short = min(width, height)
    subject = _place_in(rng, cells[first], _object_size(rng, 2, short, limit, config.min_object_px))
    reference = _place_in(rng, cells[second], _object_size(rng, 2, short, limit, config.min_object_px))
    axis = 0 if horizontal else 1  # 0: x is the relation's axis
    along = abs((reference[axis] + reference[axis + 2]) - (subject[axis] + subject[axis + 2])) / 2
    # Keep the cross-axis offset within half the along-axis offset by moving the reference
    # towards the subject's centre line (clipped to its cell).
    cross = 1 - axis
    size = reference[cross + 2] - reference[cross]
    centre = (subject[cross] + subject[cross + 2]) / 2
    lo = max(cells[second][cross], math.ceil(centre - along / 2 - size / 2))
    hi = min(cells[second][cross + 2] - size, math.floor(centre + along / 2 - size / 2))
    if reference[cross] < lo or reference[cross] > hi:
        if lo <= hi:
            start = rng.randint(lo, hi)
        else:  # centre-align, clipped to the cell
            start = min(max(round(centre - size / 2), cells[second][cross]), cells[second][cross + 2] - size)
        reference[cross], reference[cross + 2] = start, start + size
    return [subject, reference]


# ----------------------------------------------------------------------------- skills
def _obj(shape: str, color: str, box: list[int]) -> dict[str, Any]:
    return {"shape": shape, "color": color, "rgb": list(PALETTE[color]), "box": box}


def _req(shape: str, count: int = 1, exact: bool = False, color: str | None = None, position: list | None = None) -> dict:
    return {"shape": shape, "count": count, "exact": exact, "color": color, "position": position}


def _absent_shape(rng: random.Random, present: set[str], config: WorldConfig) -> str | None:
    missing = [s for s in config.shapes if s not in present]
    return rng.choice(missing) if missing else None


def _shapes_scene(rng: random.Random, skill: str, width: int, height: int, config: WorldConfig):
    """Objects, prompt requirements ("include"), caption and QA for a shape skill."""
    shapes, colors = config.shapes, config.colors
    qa: list[tuple[str, str]] = []
    if skill in ("single_object", "colors"):
        shape, color = rng.choice(shapes), rng.choice(colors)
        objects = [_obj(shape, color, _layout(rng, 1, width, height, config)[0])]
        if skill == "single_object":
            include = [_req(shape)]
            caption = f"a photo of {article(shape)} {shape}"
            qa.append(("What shape is in the image?", shape))
        else:
            include = [_req(shape, color=color)]
            caption = f"a photo of {article(color)} {color} {shape}"
            qa.append((f"What is the shape of the {color} object?", shape))
        qa += [(f"What color is the {shape}?", color), ("How many objects are there?", "1")]
    elif skill == "counting":
        shape, n = rng.choice(shapes), rng.randint(1, config.max_count)
        boxes = _layout(rng, n, width, height, config)
        objects = [_obj(shape, rng.choice(colors), box) for box in boxes]
        include = [_req(shape, count=n, exact=True)]
        noun = shape if n == 1 else plural(shape)
        caption = f"a photo of {NUMBER_WORDS[n]} {noun}"
        qa += [(f"How many {plural(shape)} are there?", str(n)), ("How many objects are there?", str(n))]
        if len({o["color"] for o in objects}) == 1:
            qa.append((f"What color {'is the' if n == 1 else 'are the'} {noun}?", objects[0]["color"]))
    elif skill in ("two_objects", "color_attr"):
        a, b = rng.sample(shapes, 2)
        ca, cb = rng.sample(colors, 2) if skill == "color_attr" else (rng.choice(colors), rng.choice(colors))
        box_a, box_b = _layout(rng, 2, width, height, config)
        objects = [_obj(a, ca, box_a), _obj(b, cb, box_b)]
        if skill == "two_objects":
            include = [_req(a), _req(b)]
            caption = f"a photo of {article(a)} {a} and {article(b)} {b}"
            qa.append((f"Is there {article(a)} {a}?", "yes"))
            absent = _absent_shape(rng, {a, b}, config)
            if absent is not None:
                qa.append((f"Is there {article(absent)} {absent}?", "no"))
        else:
            include = [_req(a, color=ca), _req(b, color=cb)]
            caption = f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"
            qa += [(f"Which shape is {ca}?", a), (f"Which shape is {cb}?", b)]
        qa += [(f"What color is the {a}?", ca), (f"What color is the {b}?", cb), ("How many objects are there?", "2")]
    elif skill == "position":
        a, b = rng.sample(shapes, 2)
        relation = rng.choice(RELATIONS)
        box_a, box_b = _relation_layout(rng, relation, width, height, config)
        objects = [_obj(a, rng.choice(colors), box_a), _obj(b, rng.choice(colors), box_b)]
        include = [_req(a, position=[relation, 1]), _req(b)]
        caption = f"a photo of {article(a)} {a} {relation} {article(b)} {b}"
        qa += [
            (f"Is the {a} {relation} the {b}?", "yes"),
            (f"Is the {a} {_OPPOSITE[relation]} the {b}?", "no"),
            (f"Which shape is {relation} the {b}?", a),
            (f"What color is the {a}?", objects[0]["color"]),
            (f"What color is the {b}?", objects[1]["color"]),
        ]
    else:  # pragma: no cover - callers validate the skill
        raise ValueError(f"unknown shape skill {skill!r}")
    return objects, include, caption, qa


def _text_words(rng: random.Random, n: int) -> list[str]:
    """A short phrase of n words from a tiny grammar (1: any word, 2: adj noun,
    3: the adj noun / noun verb, 4: the adj noun verb)."""
    noun, adj, verb = rng.choice(TEXT_NOUNS), rng.choice(TEXT_ADJECTIVES), rng.choice(TEXT_VERBS)
    if n == 1:
        return [rng.choice((noun, adj, verb))]
    if n == 2:
        return [adj, noun]
    if n == 3:
        return ["the", adj, noun] if rng.random() < 0.5 else ["the", noun, verb]
    words = ["the", adj, noun, verb]
    while len(words) < n:  # longer phrases chain clauses: "the red cat runs and the ..."
        words += ["and", rng.choice(TEXT_NOUNS), rng.choice(TEXT_VERBS)]
    return words[:n]


def _text_scene(rng: random.Random, width: int, height: int, config: WorldConfig):
    margin, _ = _margins(width, height)
    avail_w, avail_h = width - 2 * margin, height - 2 * margin
    words = _text_words(rng, rng.randint(1, config.max_words))
    max_font = max(config.min_font_px, round(0.35 * min(width, height)))
    layout: TextLayout | None = None
    while layout is None:
        layout = fit_text(words, avail_w, avail_h, max_font, config.min_font_px, config.font_path, config.supersample)
        if layout is None and len(words) == 1:
            raise ValueError(
                f"the word {words[0]!r} does not fit a {width}x{height} image at >= {config.min_font_px} px; "
                "use a larger image or lower WorldConfig.min_font_px"
            )
        if layout is None:
            words = words[:-1]
    # Vary the text size a little below the largest that fits.
    font_px = rng.randint(max(config.min_font_px, round(0.75 * layout.font_px)), layout.font_px)
    if font_px != layout.font_px:
        smaller = fit_text(words, avail_w, avail_h, font_px, font_px, config.font_path, config.supersample)
        layout = smaller if smaller is not None else layout
    x = margin + rng.randint(0, avail_w - layout.width)
    y = margin + rng.randint(0, avail_h - layout.height)
    text = " ".join(words)
    caption = f'a photo of the text "{text}"'
    qa = [("What does the text say?", text), ("How many words are there?", str(len(words)))]
    return text, layout, (x, y), caption, qa


# ----------------------------------------------------------------------------- public API
def _generate(stream: str, index: int, seed: int, height: int, width: int, skill: str | None, config: WorldConfig | None) -> WorldSample:
    config = config or WorldConfig()
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    _check_size(height, width, config)
    if skill is None:
        skill = _rng(stream, seed, index, "skill").choices(SKILLS, weights=config.skill_weights)[0]
    elif skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS} or None")
    rng = _rng(stream, seed, index, skill, f"{height}x{width}")
    meta: dict[str, Any] = {
        "skill": skill,
        "stream": stream,
        "seed": seed,
        "index": index,
        "width": width,
        "height": height,
        "background": list(config.background),
    }
    if skill == "text":
        text, layout, (x, y), caption, qa = _text_scene(rng, width, height, config)
        image = render_scene(
            width, height, config.background, [], (layout, (x, y), config.text_color), config.font_path, config.supersample
        )
        meta.update(
            objects=[],
            include=[],
            text=text,
            # Font bounding boxes span the glyph advances, not the ink, so the tight ink box
            # is read off the rendered image (the text is the only thing drawn).
            text_box=list(ImageChops.difference(image, Image.new("RGB", image.size, config.background)).getbbox()),
            text_lines=list(layout.lines),
            text_color=list(config.text_color),
            font_px=layout.font_px,
        )
    else:
        objects, include, caption, qa = _shapes_scene(rng, skill, width, height, config)
        drawn = [(o["shape"], tuple(o["rgb"]), tuple(o["box"])) for o in objects]
        image = render_scene(width, height, config.background, drawn, None, config.font_path, config.supersample)
        meta.update(objects=objects, include=include, text=None, text_box=None)
    meta["caption"] = caption
    return WorldSample(image=image, caption=caption, meta=meta, qa=qa)


def sample_world(
    index: int,
    seed: int = 0,
    height: int = 64,
    width: int = 64,
    skill: str | None = None,
    config: WorldConfig | None = None,
) -> WorldSample:
    """The training sample number ``index`` of world ``seed`` at the given size.

    ``skill=None`` draws the skill from the seed stream (weighted by
    ``config.skill_weights``); the result is then identical to asking for that skill.
    Deterministic: equal arguments give byte-identical images and equal captions.
    """
    return _generate("train", index, seed, height, width, skill, config)


def held_out_prompts(
    n: int,
    seed: int = 12345,
    height: int = 64,
    width: int = 64,
    config: WorldConfig | None = None,
    skills: Sequence[str] | None = None,
) -> list[WorldSample]:
    """``n`` evaluation samples from the "heldout" stream (disjoint from training's).

    Skills cycle through ``skills`` (default: all of SKILLS) so every skill is evenly
    represented; pass e.g. ``[s for s in SKILLS if s != "text"]`` for detector-scored prompts.
    """
    skills = tuple(SKILLS if skills is None else skills)
    if not skills or any(s not in SKILLS for s in skills):
        raise ValueError(f"skills={skills!r} must be a non-empty subset of {SKILLS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [held_out_sample(i, seed, height, width, skills[i % len(skills)], config) for i in range(n)]


def held_out_sample(
    index: int,
    seed: int = 12345,
    height: int = 64,
    width: int = 64,
    skill: str | None = None,
    config: WorldConfig | None = None,
) -> WorldSample:
    """Sample number ``index`` of the "heldout" stream alone (``held_out_prompts(n)[i]`` is
    ``held_out_sample(i, ..., skill=skills[i % len(skills)])``), for random access by index."""
    return _generate("heldout", index, seed, height, width, skill, config)
