"""World benchmark scoring: ground-truth images score 1 per skill, mismatched images score less."""

from megatron_xomni.evaluation.world_bench import markdown_table, score_world_benchmark, world_benchmark_prompts
from megatron_xomni.world import SKILLS


def test_ground_truth_images_score_one_and_blank_images_zero():
    from PIL import Image

    prompts = world_benchmark_prompts(n_per_skill=2, skills=[s for s in SKILLS if s != "text"])
    report = score_world_benchmark(prompts, [[p.image, p.image] for p in prompts])
    assert set(report["per_skill"]) == set(SKILLS) - {"text"}
    assert all(v == 1.0 for v in report["per_skill"].values()) and report["overall"] == 1.0
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    low = score_world_benchmark(prompts, [[blank] for _ in prompts])
    assert low["overall"] == 0.0
    table = markdown_table({"gt": report, "blank": low})
    assert "| **overall** | **1.000** | **0.000** |" in table


def test_text_skill_is_the_longtext_word_match_of_the_ocr_reading():
    """The text skill is scored by the LongText metric (no reward plugin): an OCR that reads back half of
    the requested words scores matched / total, the same value the `ocr_text` reward gives."""
    from PIL import Image

    from megatron_xomni.rewards import get_reward

    prompts = world_benchmark_prompts(n_per_skill=4, skills=["text"])
    readings = {}
    images = []
    for p in prompts:
        words = p.meta["text"].split()
        img = Image.new("RGB", (64, 64))
        readings[id(img)] = " ".join(words[: len(words) // 2 + 1])  # the first half (rounded up) of the words
        images.append([img])
    fake_ocr = lambda im: readings[id(im)]  # noqa: E731
    report = score_world_benchmark(prompts, images, ocr=fake_ocr)
    by_hand = [(len(p.meta["text"].split()) // 2 + 1) / len(p.meta["text"].split()) for p in prompts]
    assert abs(report["per_skill"]["text"] - sum(by_hand) / len(by_hand)) < 1e-12
    reward = get_reward("ocr_text", ocr=fake_ocr)
    via_reward = [reward([p.caption], im, [p.meta])[0] for p, im in zip(prompts, images)]
    assert [r["score"] for r in report["rows"]] == via_reward
    assert 0.0 < report["per_skill"]["text"] < 1.0
