"""The README's main job, shortened (`--smoke`): every stage runs, the report is written, and a
rerun resumes (skips every finished stage)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    published = tmp_path / "published"
    cmd = [sys.executable, "-m", "megatron_xomni.cli", "demo", "--out", str(out), "--smoke", "--publish", str(published)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    from megatron_xomni.demo.stages import ALL

    for stage in ALL:
        assert (out / stage / "DONE.json").exists(), stage
    for f in ["report.md", "curves.png", "eval_sft/eval.json", "eval_grpo/eval.json", "eval_sft/samples.png"]:
        assert (out / f).stat().st_size > 0, f
    report = (out / "report.md").read_text()
    assert "best-of-2" in report and "| **overall** |" in report
    for part in ["model", "text_tokenizer", "image_tokenizer", "decoder"]:  # `xomni generate --bundle`
        assert (out / "bundle" / part).is_dir(), part
    sft = json.loads((out / "eval_sft" / "eval.json").read_text())
    assert 0.0 <= sft["mean_reward"] <= sft["best_of_n_reward"] <= 1.0
    # the diagnostics: 2 decoder seeds per sequence, the honest best-of-N, both per-skill metrics
    assert sft["decoder_seeds"] == 2 and len(sft["decode_rewards"]) == 2
    assert 0.0 <= sft["honest_best_of_n_reward"] <= 1.0
    assert set(sft["per_skill_metrics"]["accuracy"]) == set(sft["per_skill_metrics"]["partial_credit"])
    for k, acc in sft["per_skill_metrics"]["accuracy"].items():
        assert acc <= sft["per_skill_metrics"]["partial_credit"][k]  # all-or-nothing never beats partial credit
    for section in ("## Targets", "honest best-of-2", "## Noise floor", "all-or-nothing", "## Ceiling and headroom"):
        assert section in report, section
    figures = json.loads((out / "figures.json").read_text())
    assert figures["sft_honest_best_of_n"] == sft["honest_best_of_n_reward"]
    # direction, not only existence: SFT lowers its loss; GRPO logs the dropped-group share every step
    done = json.loads((out / "sft" / "DONE.json").read_text())
    assert done["last_loss"] < done["first_loss"]
    grpo = [json.loads(l) for l in (out / "grpo" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(grpo) == 2 and all(0.0 <= r["grpo_dropped_group_share"] <= 1.0 for r in grpo)
    assert (published / "report.md").read_text() == report
    assert (published / "eval_grpo" / "samples.png").stat().st_size > 0
    # direction, not only existence: the codes inform the teacher, the trained decoder renders them better
    # than the untrained one (fitted VAE, zero semantic projection)
    health = json.loads((out / "tokenizer_health" / "DONE.json").read_text())
    assert health["caption_gap_pct"] > 0, health
    assert set(health["probes"]) >= {"colour", "shape", "count", "position", "codes_all"}
    ceiling = json.loads((out / "ceiling" / "DONE.json").read_text())
    assert ceiling["ceiling"] > ceiling["untrained_ceiling"], ceiling
    assert set(ceiling["per_skill"]) == {"single_object", "two_objects", "counting", "colors", "position", "color_attr"}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("already done") == len(ALL)
