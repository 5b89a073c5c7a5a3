"""LongText-Bench metric against hand-computed values and a brute-force multiset match."""
import random

import pytest
from PIL import Image

from megatron_xomni.evaluation.benchmarks import BenchmarkPrompt
from megatron_xomni.evaluation.longtext import (
    detect_lang,
    evaluate_image_dir,
    evaluate_images,
    match_counts,
    normalize,
    text_accuracy,
)


@pytest.mark.parametrize(
    "gt, ocr, expected",
    [
        # case and punctuation are ignored; 2 of the 4 ground-truth words are read
        ("Hello world, hello again!", "HELLO... world", (2, 4)),
        # repeated words count at most as often as they occur in the ground truth
        ("the cat the hat", "the the the cat", (3, 4)),
        # order does not matter
        ("one two three", "three one two", (3, 3)),
        # punctuation is deleted without a space: "well-known" == "wellknown", "It's" == "its"
        ("It's a well-known fact.", "its a wellknown fact", (4, 4)),
        # ... so a split reading does not match the joined ground-truth word
        ("It's a well-known fact.", "it s a well known fact", (2, 4)),
        # extra OCR words cost nothing, missing ones do
        ("open daily", "we are open daily from nine", (2, 2)),
        (["Grand", "Opening Sale"], "grand sale", (2, 3)),
        ("Café crème", "CAFÉ CRÈME", (2, 2)),
    ],
)
def test_english_matches_hand_computed(gt, ocr, expected):
    assert match_counts(gt, ocr, "en") == expected
    assert text_accuracy(gt, ocr, "en") == pytest.approx(expected[0] / expected[1])


@pytest.mark.parametrize(
    "gt, ocr, expected",
    [
        # characters, punctuation and whitespace ignored: gt {你:2, 好:2, 世, 界}, ocr {世, 界, 你, 好:2}
        ("你好，世界！你好", "世界 你好 好", (5, 6)),
        ("春眠不觉晓", "晓觉不眠春", (5, 5)),
        ("欢迎光临", "", (0, 4)),
        # Latin letters count as characters and are case-sensitive in zh mode
        ("AI 时代", "ai时代", (2, 4)),
    ],
)
def test_chinese_matches_hand_computed(gt, ocr, expected):
    assert match_counts(gt, ocr, "zh") == expected


def test_normalize_and_language_detection():
    assert normalize("Don't STOP—believing!", "en") == ["dont", "stopbelieving"]
    assert normalize("你好, world 1", "zh") == ["你", "好", "w", "o", "r", "l", "d", "1"]
    assert detect_lang("打折 50%") == "zh" and detect_lang("SALE 50%") == "en"
    assert match_counts("你好", "你") == (1, 2)  # lang detected from the ground truth
    assert text_accuracy("!!!", "anything", "en") == 0.0  # nothing countable -> 0, as published
    with pytest.raises(ValueError, match="lang"):
        normalize("x", "fr")


def _brute_force_matched(gt: list[str], ocr: list[str]) -> int:
    """Greedy removal: each ground-truth unit consumes one equal OCR unit if any is left."""
    pool = list(ocr)
    matched = 0
    for unit in gt:
        if unit in pool:
            pool.remove(unit)
            matched += 1
    return matched


def test_random_strings_match_brute_force():
    rng = random.Random(0)
    vocab = ["sale", "open", "Cafe", "menu", "the", "A", "b2"]
    for _ in range(200):
        gt = [rng.choice(vocab) for _ in range(rng.randint(1, 9))]
        ocr = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        gt_text = " ".join(w + rng.choice(["", ",", "!", "."]) for w in gt)
        matched, total = match_counts(gt_text, " ".join(ocr), "en")
        assert total == len(gt)
        assert matched == _brute_force_matched([w.lower() for w in gt], [w.lower() for w in ocr])


def _prompt(pid, text, lang):
    return BenchmarkPrompt(id=pid, prompt="p", meta={"prompt_id": pid, "text": text, "lang": lang})


def test_report_aggregates_micro_macro_and_per_language():
    prompts = [_prompt("0000", "a b", "en"), _prompt("0001", "c d e", "en"), _prompt("0000z", "你好", "zh")]
    images = [Image.new("RGB", (8 + i, 8)) for i in range(3)]
    readings = {8: "a x", 9: "c d e", 10: "你"}  # matched 1/2, 3/3, 1/2
    report = evaluate_images(zip(prompts, images), ocr=lambda im: readings[im.width])
    assert [(r.matched, r.total) for r in report.results] == [(1, 2), (3, 3), (1, 2)]
    assert report.accuracy == pytest.approx(5 / 7)
    assert report.mean_accuracy == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert report.by_lang() == pytest.approx({"en": 4 / 5, "zh": 1 / 2})


def test_image_dir_layout(tmp_path):
    prompts = [_prompt("0000", "hello world", "en"), _prompt("0001", "good bye", "en")]
    # file name encodes the prompt id; width tells the fake OCR what to "read"
    for name, width in [("0000_1.png", 10), ("0000_2.png", 11), ("0001_1.png", 12)]:
        Image.new("RGB", (width, 8), "white").save(tmp_path / name)
    readings = {10: "hello world", 11: "hello", 12: "nothing"}
    report = evaluate_image_dir(prompts, tmp_path, ocr=lambda im: readings[im.width])
    assert [(r.prompt_id, r.matched, r.total) for r in report.results] == [("0000", 2, 2), ("0000", 1, 2), ("0001", 0, 2)]
    assert report.accuracy == pytest.approx(3 / 6)
    assert report.results[2].image_path.endswith("0001_1.png")

    Image.new("RGB", (8, 8)).save(tmp_path / "0099_1.png")
    with pytest.raises(ValueError, match="0099"):
        evaluate_image_dir(prompts, tmp_path, ocr=lambda im: "")
    with pytest.raises(FileNotFoundError):
        evaluate_image_dir(prompts, tmp_path / "missing", ocr=lambda im: "")
