"""Tests of the GenEval-style world detector: ground truth, hand-drawn scenes, mismatches, blur."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from megatron_xomni.world import PALETTE, SKILLS, sample_world
from megatron_xomni.world.detector import detect_objects, relation_holds, score_image

SHAPE_SKILLS = [s for s in SKILLS if s != "text"]


def _degrade(image: Image.Image, radius: float, noise: float, seed: int) -> Image.Image:
    """Gaussian blur then additive Gaussian noise, like a small generator's output."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("skill", SHAPE_SKILLS)
def test_ground_truth_images_score_one(skill):
    for index in range(100):
        s = sample_world(index, skill=skill)
        result = score_image(s.image, s.meta)
        assert result["score"] == 1.0 and result["fraction"] == 1.0, (index, s.caption, result)
    for height, width in [(128, 128), (64, 192), (192, 64), (384, 384)]:
        for index in range(5):
            s = sample_world(index, skill=skill, height=height, width=width)
            assert score_image(s.image, s.meta)["score"] == 1.0, (height, width, index, s.caption)


def test_detections_match_ground_truth_objects():
    for skill in ("counting", "color_attr"):
        for index in range(30):
            s = sample_world(index, skill=skill, height=128, width=128)
            found = detect_objects(s.image)
            truth = sorted((o["shape"], o["color"], tuple(o["box"])) for o in s.meta["objects"])
            got = sorted((d["shape"], d["color"], tuple(d["box"])) for d in found)
            assert [t[:2] for t in truth] == [g[:2] for g in got]
            for t, g in zip(truth, got):
                assert np.abs(np.subtract(t[2], g[2])).max() <= 1, (t, g)


def test_hand_drawn_scene():
    """A scene drawn here with plain Pillow calls (not the world renderer), hard-edged."""
    image = Image.new("RGB", (160, 120), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse([10, 40, 49, 79], fill=PALETTE["red"])  # red circle, left
    draw.rectangle([110, 40, 149, 79], fill=PALETTE["blue"])  # blue square, right
    draw.polygon([(80, 5), (98, 35), (62, 35)], fill=PALETTE["green"])  # green triangle, top middle
    draw.polygon([(80, 82), (96, 98), (80, 114), (64, 98)], fill=PALETTE["yellow"])  # yellow diamond, bottom
    found = {(d["shape"], d["color"]) for d in detect_objects(image)}
    assert found == {("circle", "red"), ("square", "blue"), ("triangle", "green"), ("diamond", "yellow")}

    def req(shape, count=1, exact=False, color=None, position=None):
        return {"shape": shape, "count": count, "exact": exact, "color": color, "position": position}

    def score(*include):
        return score_image(image, {"skill": "test", "include": list(include)})

    assert score(req("circle", color="red"), req("square", color="blue"))["score"] == 1.0
    assert score(req("circle", position=["left of", 1]), req("square"))["score"] == 1.0
    assert score(req("triangle", position=["above", 1]), req("diamond"))["score"] == 1.0
    assert score(req("circle", count=1, exact=True))["score"] == 1.0
    # Wrong colour, wrong relation, wrong count, absent shape: all fail, checks say which.
    wrong_color = score(req("circle", color="purple"))
    assert wrong_color["score"] == 0.0 and wrong_color["fraction"] == 0.5
    assert score(req("circle", position=["right of", 1]), req("square"))["score"] == 0.0
    assert score(req("triangle", position=["below", 1]), req("diamond"))["score"] == 0.0
    assert score(req("square", count=2, exact=True))["score"] == 0.0
    assert score(req("square", count=2))["score"] == 0.0


def test_relation_closed_form():
    left, right = [0, 40, 20, 60], [60, 45, 80, 65]
    assert relation_holds(left, right, "left of") and relation_holds(right, left, "right of")
    assert not relation_holds(left, right, "right of") and not relation_holds(left, right, "above")
    top, bottom = [30, 0, 50, 20], [32, 50, 52, 70]
    assert relation_holds(top, bottom, "above") and relation_holds(bottom, top, "below")
    # At 45 degrees both axes carry > half the distance: "left of" and "above" both hold
    # (GenEval's rule); steeply below-left, (-10, -40) with 4 px slack, is only "above".
    assert relation_holds([0, 0, 20, 20], [40, 40, 60, 60], "left of")
    assert relation_holds([0, 0, 20, 20], [40, 40, 60, 60], "above")
    assert not relation_holds([30, 0, 50, 20], [40, 40, 60, 60], "left of")
    assert relation_holds([30, 0, 50, 20], [40, 40, 60, 60], "above")
    # Barely apart horizontally (offset within the 10 % slack of the sizes): no relation.
    assert not relation_holds([0, 0, 20, 20], [3, 0, 23, 20], "left of")
    with pytest.raises(ValueError, match="relation"):
        relation_holds(left, right, "inside")


def _mismatch(meta: dict, rng: np.random.Generator) -> dict:
    """The same prompt with one requirement changed so the image no longer satisfies it."""
    meta = copy.deepcopy(meta)
    include = meta["include"]
    present = {o["shape"] for o in meta["objects"]}
    skill = meta["skill"]
    if skill == "counting":
        n = include[0]["count"]
        include[0]["count"] = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    elif skill in ("colors", "color_attr"):
        item = include[int(rng.integers(len(include)))]
        item["color"] = next(c for c in PALETTE if c != item["color"])
    elif skill == "position":
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        include[0]["position"][0] = opposite[include[0]["position"][0]]
    else:  # single_object, two_objects: ask for a shape that is not there
        include[-1]["shape"] = next(s for s in ("circle", "square", "triangle", "diamond") if s not in present)
    return meta


def test_mismatched_prompts_score_lower():
    rng = np.random.default_rng(0)
    for skill in SHAPE_SKILLS:
        for index in range(40):
            s = sample_world(index, skill=skill)
            result = score_image(s.image, _mismatch(s.meta, rng))
            assert result["score"] == 0.0 and result["fraction"] < 1.0, (skill, index, s.caption, result["checks"])
    # Image of one sample with the meta of another sample of the same skill: whenever the two
    # requests differ, the score drops.
    for skill in ("counting", "color_attr", "position"):
        lowered = 0
        for index in range(40):
            a, b = sample_world(index, skill=skill), sample_world(index + 1000, skill=skill)
            if a.meta["include"] != b.meta["include"]:
                lowered += score_image(a.image, b.meta)["score"] == 0.0
        assert lowered >= 30, (skill, lowered)


@pytest.mark.parametrize("radius,noise", [(1.0, 8.0), (1.5, 12.0)])
def test_robust_to_blur_and_noise(radius, noise):
    for skill in SHAPE_SKILLS:
        for index in range(60):
            s = sample_world(index, skill=skill)
            result = score_image(_degrade(s.image, radius, noise, index), s.meta)
            assert result["score"] == 1.0, (skill, index, s.caption, result["checks"])
    # Larger and elongated images, with blur scaled to the size.
    for height, width in [(128, 128), (64, 192)]:
        for skill in SHAPE_SKILLS:
            for index in range(10):
                s = sample_world(index, skill=skill, height=height, width=width)
                scaled = radius * min(height, width) / 64
                assert score_image(_degrade(s.image, scaled, noise, index), s.meta)["score"] == 1.0


def test_text_skill_is_left_to_ocr_and_bad_meta_raises():
    s = sample_world(0, skill="text")
    assert score_image(s.image, s.meta) == {"score": None, "fraction": None, "checks": {}, "detections": []}
    with pytest.raises(ValueError, match="meta"):
        score_image(s.image, {"skill": "counting"})
    with pytest.raises(ValueError, match="unknown shape"):
        score_image(s.image, {"skill": "x", "include": [{"shape": "hexagon", "count": 1}]})
    with pytest.raises(ValueError, match="array"):
        score_image(np.zeros((8, 8)), sample_world(0, skill="colors").meta)
    # A blank canvas holds nothing: every request fails.
    meta = sample_world(0, skill="two_objects").meta
    assert score_image(Image.new("RGB", (64, 64), tuple(meta["background"])), meta)["fraction"] == 0.0
