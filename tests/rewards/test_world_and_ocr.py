"""Built-in rewards on real inputs: the world detector and RapidOCR (bundled models, no network)."""
import socket

import pytest
from PIL import Image, ImageDraw, ImageFont

from megatron_xomni.evaluation.ocr import RapidOCREngine, default_ocr
from megatron_xomni.rewards import RewardEnsemble, get_reward

SENTENCE = "Hello brave new world"


def _rendered(text=SENTENCE, size=(384, 96)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 30), text, fill="black", font=ImageFont.load_default(size=32))
    return image


def _blank(size=(384, 96)):
    return Image.new("RGB", size, "white")


def test_world_alignment_wraps_the_detector():
    world = pytest.importorskip("megatron_xomni.world")
    from megatron_xomni.world.detector import score_image

    samples = [world.sample_world(i, skill=skill, height=128, width=128)
               for i, skill in enumerate(["single_object", "counting", "position", "color_attr"])]
    images = [s.image for s in samples]
    metas = [s.meta for s in samples]
    reward = get_reward("world_alignment")
    got = reward([s.caption for s in samples], images, metas)
    assert got == [score_image(im, m)["fraction"] for im, m in zip(images, metas)]
    assert all(0.0 <= v <= 1.0 for v in got)
    strict = get_reward("world_alignment", field="score")
    assert strict([samples[0].caption], images[:1], metas[:1]) == [score_image(images[0], metas[0])["score"]]
    # an empty canvas shows no object at all: the single-object request fails
    background = Image.new("RGB", (128, 128), tuple(metas[0]["background"]))
    assert reward(["p"], [background], [metas[0]]) == [0.0]
    # not applicable: the world's text skill, a LongText meta, a GenEval meta (no world skill)
    text_sample = world.sample_world(0, skill="text")
    geneval_meta = {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert reward(["a", "b", "c"], [text_sample.image] * 3,
                  [text_sample.meta, {"text": "sale"}, geneval_meta]) == [None, None, None]


def test_ocr_engine_uses_bundled_models_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"OCR tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    engine = RapidOCREngine()  # fresh engine, so model loading happens under the guard
    assert engine(_rendered()) == SENTENCE
    assert engine(_blank()) == ""


def test_ocr_text_reward_reads_rendered_text():
    reward = get_reward("ocr_text")
    metas = [{"text": "hello, brave new world!"}, {"text": SENTENCE}, {}, {"text": None}, {"text": "!!"}]
    images = [_rendered(), _blank(), _rendered(), _rendered(), _rendered()]
    scores = reward(["p"] * 5, images, metas)
    assert scores[0] >= 0.9
    assert scores[1] == 0.0
    assert scores[2:] == [None, None, None]  # no text asked for / nothing countable
    assert reward.ocr is default_ocr()  # the engine is created once per process and shared
    # partial rendering: 2 of the 4 requested words are in the image
    half = get_reward("ocr_text")(["p"], [_rendered("brave world")], [{"text": SENTENCE}])
    assert half == [pytest.approx(0.5)]


def test_ocr_text_reward_with_pluggable_engine():
    readings = {10: "GRAND opening", 11: "大促销"}
    reward = get_reward("ocr_text", ocr=lambda im: readings[im.width])
    images = [Image.new("RGB", (10, 4)), Image.new("RGB", (11, 4))]
    metas = [{"text": ["Grand Opening", "Sale"]}, {"text": "大促销活动", "lang": "zh"}]
    assert reward(["a", "b"], images, metas) == [pytest.approx(2 / 3), pytest.approx(3 / 5)]
    with pytest.raises(ValueError, match="lang"):
        get_reward("ocr_text", lang="de")


def test_ensemble_of_builtin_rewards():
    world = pytest.importorskip("megatron_xomni.world")
    sample = world.sample_world(3, skill="colors", height=128, width=128)
    ensemble = RewardEnsemble({"ocr_text": 1.0, "world_alignment": 1.0})
    images = [_rendered(), sample.image, _blank()]
    # the text rows say "no detector request" explicitly (include: null): not applicable, no failure
    metas = [{"text": SENTENCE, "include": None}, sample.meta, {"text": SENTENCE, "include": None}]
    result = ensemble(["p", sample.caption, "p"], images, metas)
    ocr_vals, world_vals = result.components["ocr_text"], result.components["world_alignment"]
    assert world_vals[0] is None and world_vals[2] is None and ocr_vals[1] is None
    # one applicable component per image: its value, rescaled to the full weight total 2
    assert result.total == [pytest.approx(2 * ocr_vals[0]), pytest.approx(2 * world_vals[1]), 0.0]
    assert ocr_vals[0] >= 0.9 and result.failures == {}
    # rows that lack the field altogether: the same totals (failures are excluded), but counted
    lacking = ensemble(["p", sample.caption, "p"], images, [{"text": SENTENCE}, sample.meta, {"text": SENTENCE}])
    assert lacking.total == result.total and lacking.components == result.components
    assert lacking.failures == {"world_alignment": [0, 2]} and lacking.missing_fields == {"world_alignment": 2}
