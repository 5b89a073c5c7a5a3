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
