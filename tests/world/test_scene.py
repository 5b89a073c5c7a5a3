"""Tests of the built-in data world generator against independent pixel-level checks."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from megatron_xomni.world import PALETTE, SKILLS, WorldConfig, held_out_prompts, sample_world

SHAPE_SKILLS = [s for s in SKILLS if s != "text"]
SIZES = [(64, 64), (128, 128), (64, 192), (192, 64), (384, 384), (48, 144)]  # (height, width)
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
BG = np.array(WorldConfig().background, dtype=np.int64)
# Area of each shape as a fraction of its (square) box: closed forms, not the renderer.
AREA_FRACTION = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "diamond": 0.5}


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int64)


def test_deterministic_and_index_addressable():
    for skill in SKILLS:
        a = sample_world(7, seed=3, skill=skill)
        b = sample_world(7, seed=3, skill=skill)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.caption, a.meta, a.qa) == (b.caption, b.meta, b.qa)
        others = [sample_world(i, seed=3, skill=skill).image.tobytes() for i in range(8)]
        assert len(set(others)) == 8, f"{skill}: different indices must give different images"
        assert sample_world(7, seed=4, skill=skill).image.tobytes() != a.image.tobytes()


def test_unspecified_skill_is_drawn_from_the_stream_and_reproducible():
    counts = {s: 0 for s in SKILLS}
    for i in range(140):
        s = sample_world(i)
        counts[s.meta["skill"]] += 1
        explicit = sample_world(i, skill=s.meta["skill"])
        assert explicit.image.tobytes() == s.image.tobytes() and explicit.caption == s.caption
    assert all(c >= 8 for c in counts.values()), counts  # uniform: 20 expected each
    weights = tuple(1.0 if s == "counting" else 0.0 for s in SKILLS)
    assert {sample_world(i, config=WorldConfig(skill_weights=weights)).meta["skill"] for i in range(20)} == {"counting"}


@pytest.mark.parametrize("height,width", SIZES)
def test_sizes_aspect_and_json(height, width):
    for skill in SKILLS:
        s = sample_world(1, height=height, width=width, skill=skill)
        assert s.image.mode == "RGB" and s.image.size == (width, height)
        assert (s.meta["width"], s.meta["height"]) == (width, height)
        assert json.loads(json.dumps(s.meta)) == s.meta
        for obj in s.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        sample_world(0, height=64, width=256)
    with pytest.raises(ValueError, match="too small"):
        sample_world(0, height=16, width=16)
    with pytest.raises(ValueError, match="unknown skill"):
        sample_world(0, skill="juggling")
    with pytest.raises(ValueError, match="index"):
        sample_world(-1)
    with pytest.raises(ValueError, match="shapes"):
        WorldConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="skills"):
        held_out_prompts(3, skills=["juggling"])


@pytest.mark.parametrize("height,width", SIZES)
def test_boxes_agree_with_pixels(height, width):
    for skill in SHAPE_SKILLS:
        for index in range(12):
            s = sample_world(index, height=height, width=width, skill=skill)
            px = _pixels(s)
            outside = np.ones(px.shape[:2], dtype=bool)
            boxes = [o["box"] for o in s.meta["objects"]]
            for obj in s.meta["objects"]:
                x0, y0, x1, y1 = obj["box"]
                colour = np.array(PALETTE[obj["color"]])
                assert obj["rgb"] == list(PALETTE[obj["color"]])
                # The box centre is inside every shape, so it has the exact palette colour.
                assert (px[(y0 + y1) // 2, (x0 + x1) // 2] == colour).all(), (skill, index, obj)
                # The shape touches all four box edges.
                inked = (px[y0:y1, x0:x1] != BG).any(axis=2)
                assert inked[0].any() and inked[-1].any() and inked[:, 0].any() and inked[:, -1].any()
                # Covered area (each pixel's fraction of the way from background to the colour)
                # matches the closed-form area of the named shape.
                direction = colour - BG
                alpha = ((px[y0:y1, x0:x1] - BG) @ direction) / (direction @ direction)
                expected = AREA_FRACTION[obj["shape"]] * (x1 - x0) * (y1 - y0)
                assert abs(alpha.sum() - expected) <= 0.04 * expected + 2, (obj, alpha.sum(), expected)
                outside[y0:y1, x0:x1] = False
            # Nothing is drawn outside the boxes.
            assert (px[outside] == BG).all(), (skill, index)
            # Boxes never overlap and keep a gap of at least 3 px.
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert gap >= 3, (skill, index, a, b)


def _only(objects, shape):
    found = [o for o in objects if o["shape"] == shape]
    assert len(found) == 1
    return found[0]


def _centre(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def test_captions_and_answers_match_ground_truth():
    for skill in SHAPE_SKILLS:
        for index in range(40):
            s = sample_world(index, skill=skill)
            objs, cap = s.meta["objects"], s.caption
            assert cap.startswith("a photo of ") and s.meta["caption"] == cap
            if skill == "counting":
                word, noun = re.fullmatch(r"a photo of (\w+) (\w+)", cap).groups()
                assert len(objs) == NUMBERS[word]
                assert all(noun.rstrip("s") == o["shape"] for o in objs)
            elif skill in ("single_object", "colors"):
                assert len(objs) == 1
                words = cap.split()
                assert words[-1] == objs[0]["shape"]
                if skill == "colors":
                    assert words[-2] == objs[0]["color"]
            elif skill in ("two_objects", "color_attr"):
                parts = re.fullmatch(r"a photo of an? (.+) and an? (.+)", cap).groups()
                assert len(objs) == 2
                for part, obj in zip(parts, objs):
                    expected = obj["shape"] if skill == "two_objects" else f"{obj['color']} {obj['shape']}"
                    assert part == expected
                assert objs[0]["shape"] != objs[1]["shape"]
            elif skill == "position":
                a, relation, b = re.fullmatch(r"a photo of an? (\w+) (left of|right of|above|below) an? (\w+)", cap).groups()
                (ax, ay), (bx, by) = _centre(_only(objs, a)["box"]), _centre(_only(objs, b)["box"])
                dx, dy = ax - bx, ay - by
                along, cross = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
                sign = -1 if relation in ("left of", "above") else 1
                assert sign * along > 0 and abs(cross) <= abs(along) / 2 + 0.5, (cap, objs)
            for question, answer in s.qa:
                if question == "How many objects are there?":
                    assert int(answer) == len(objs)
                elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
                    assert int(answer) == sum(o["shape"] == m.group(1) for o in objs)
                elif m := re.fullmatch(r"What color is the (\w+)\?", question):
                    assert answer == _only(objs, m.group(1))["color"]
                elif m := re.fullmatch(r"Is there an? (\w+)\?", question):
                    assert answer == ("yes" if any(o["shape"] == m.group(1) for o in objs) else "no")
                elif m := re.fullmatch(r"Which shape is (\w+)\?", question):
                    assert [o["shape"] for o in objs if o["color"] == m.group(1)] == [answer]


def test_text_ground_truth_box_and_qa():
    for size in [(64, 64), (128, 128), (64, 192)]:
        for index in range(10):
            s = sample_world(index, height=size[0], width=size[1], skill="text")
            text, box = s.meta["text"], s.meta["text_box"]
            assert s.caption == f'a photo of the text "{text}"'
            assert ("What does the text say?", text) in s.qa
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", text)
            px = _pixels(s)
            ys, xs = np.nonzero((px != BG).any(axis=2))
            # The box is the tight box of the ink.
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # The text stays off the border and is never clipped: more lines need more height.
            assert 0 < box[0] and 0 < box[1] and box[2] < size[1] and box[3] < size[0]
            assert len(s.meta["text_lines"]) >= 1 and " ".join(s.meta["text_lines"]) == text
            assert s.meta["font_px"] >= WorldConfig().min_font_px


def test_rendered_text_is_readable_by_ocr():
    rapidocr = pytest.importorskip("rapidocr")
    engine = rapidocr.RapidOCR()
    for index in (2, 3):  # two multi-line samples
        s = sample_world(index, height=128, width=128, skill="text")
        result = engine(np.asarray(s.image))
        assert " ".join(result.txts).lower().split() == s.meta["text"].split()
        # OCR's own (padded) text boxes enclose the ground-truth box and are not much larger.
        quads = np.asarray(result.boxes)
        ox0, oy0, ox1, oy1 = quads[..., 0].min(), quads[..., 1].min(), quads[..., 0].max(), quads[..., 1].max()
        x0, y0, x1, y1 = s.meta["text_box"]
        assert ox0 <= x0 + 1 and oy0 <= y0 + 1 and ox1 >= x1 - 1 and oy1 >= y1 - 1
        assert (x1 - x0) * (y1 - y0) >= 0.3 * (ox1 - ox0) * (oy1 - oy0)


def test_held_out_prompts_are_a_separate_reproducible_stream():
    held = held_out_prompts(14, seed=5)
    assert [h.meta["skill"] for h in held] == list(SKILLS) * 2
    again = held_out_prompts(14, seed=5)
    assert [h.image.tobytes() for h in held] == [h.image.tobytes() for h in again]
    for i, h in enumerate(held):
        train = sample_world(i, seed=5, skill=h.meta["skill"])
        assert train.image.tobytes() != h.image.tobytes()
    only = held_out_prompts(6, skills=["counting", "position"])
    assert [h.meta["skill"] for h in only] == ["counting", "position"] * 3
