"""The demo report's targets, the seed spread and publishing, on hand-made evaluation results."""

import json
import math

import pytest

from megatron_xomni.demo import report as rep
from megatron_xomni.demo.cli import SPREAD_HEADING, publish


def _eval(mean, best, honest, acc, share_ind, share_shared):
    return {"mean_reward": mean + 0.01, "mean_reward_all_decodes": mean, "best_of_n_reward": best,
            "honest_best_of_n_reward": honest, "per_skill_metrics": {"accuracy": acc},
            "noise_floor": {"decoder_share_within": share_ind, "decoder_share_within_shared_seed": share_shared,
                            "decoder_share_overall": 0.3},
            "ground_truth_codes_reward": 0.9, "ground_truth_codes_reward_per_skill": {"colors": 0.8, "counting": 1.0}}


SFT = _eval(0.30, 0.70, 0.40, {"colors": 0.2, "counting": 0.5}, 0.5, 0.08)
GRPO = _eval(0.45, 0.80, 0.60, {"colors": 0.3, "counting": 0.45}, 0.4, 0.05)


def test_targets_say_met_or_missed_by_how_much():
    fig = rep.target_figures(SFT, GRPO, rep.ceiling_figures(None, SFT), seconds=1000.0)
    assert fig["grpo_mean"] == 0.45 and fig["sft_honest_best_of_n"] == 0.40  # the mean over all decodes
    assert fig["grpo_mean_minus_sft_honest"] == pytest.approx(0.05)
    assert fig["min_skill_gain"] == pytest.approx(-0.05)  # counting fell 0.5 -> 0.45
    rows = {t: (m, g) for t, _, m, g in rep.targets(fig)}
    assert rows["GRPO mean > SFT honest best-of-N"] == (True, "+0.050")
    assert rows["every skill's accuracy up after RL (smallest gain > 0)"] == (False, "-0.050")
    assert rows["ceiling >= 0.85"] == (True, "+0.050")
    noise = [k for k in rows if k.startswith("decoder-seed share")][0]
    assert rows[noise] == (True, "-0.020")
    assert rows["pipeline <= 15 min (this run's stages)"] == (False, "+100")


def test_spread_is_mean_min_max_over_seeds_and_counts_targets_met():
    figs = [rep.target_figures(SFT, GRPO, rep.ceiling_figures(None, SFT), s) for s in (600.0, 700.0, 1100.0)]
    figs[1]["grpo_mean"] = 0.35
    s = rep.spread(figs)
    assert s["grpo_mean"] == {"mean": pytest.approx((0.45 + 0.35 + 0.45) / 3), "min": 0.35, "max": 0.45}
    assert s["pipeline_seconds"]["mean"] == pytest.approx(800.0)
    text = rep.render_spread([0, 1, 2], figs)
    assert "| pipeline_seconds | 800.000 | 600.000 | 1100.000 |" in text
    assert "| GRPO mean > SFT honest best-of-N | 2/3 |" in text  # seed 1: 0.35 < 0.40
    assert "| pipeline <= 15 min (this run's stages) | 2/3 |" in text
    nan = dict(figs[0], ceiling=float("nan"))
    assert math.isnan(rep.spread([nan])["ceiling"]["mean"])


def test_publish_copies_the_report_and_keeps_the_spread_section(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "published"
    (run / "eval_sft").mkdir(parents=True)
    (run / "report.md").write_text("# report one\n")
    (run / "eval_sft" / "eval.json").write_text(json.dumps({"a": 1}))
    publish(run, dest, SPREAD_HEADING + "\n\n| figure | mean |\n")
    assert (dest / "report.md").read_text() == "# report one\n\n" + SPREAD_HEADING + "\n\n| figure | mean |\n"
    assert json.loads((dest / "eval_sft" / "eval.json").read_text()) == {"a": 1}
    (run / "report.md").write_text("# report two\n")  # a later single-seed `make demo`
    publish(run, dest)
    assert (dest / "report.md").read_text() == "# report two\n\n" + SPREAD_HEADING + "\n\n| figure | mean |\n"


def test_set_overrides_are_typed_and_bad_ones_name_the_fix():
    from megatron_xomni.demo.cli import _overrides, main

    got = _overrides(["grpo_lr=3e-4", "grpo_steps=80", "grpo_shared_decoder_seed=false"])
    assert got == {"grpo_lr": 3e-4, "grpo_steps": 80, "grpo_shared_decoder_seed": False}
    for bad, words in (["grpo_steps=many", "takes a int"], ["nope=1", "KEY one of"], ["grpo_shared_decoder_seed=maybe", "bool"]):
        with pytest.raises(ValueError, match=words):
            _overrides([bad])
    with pytest.raises(SystemExit) as exit_:
        main(["--set", "grpo_lr=fast", "--out", "/nonexistent/never-written"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--seeds", "0,0"])
    assert exit_.value.code == 2


def test_ceiling_comes_from_the_ceiling_stage_when_it_ran(tmp_path):
    from types import SimpleNamespace

    from megatron_xomni.demo import report as rep

    ctx = SimpleNamespace(out=tmp_path)
    assert rep.ceiling_figures(ctx, SFT)["source"] == "SFT evaluation"  # no ceiling stage yet
    (tmp_path / "ceiling").mkdir()
    (tmp_path / "ceiling" / "DONE.json").write_text(json.dumps(
        {"ceiling": 0.711, "per_skill": {"colors": 0.9}, "untrained_ceiling": 0.37}))
    got = rep.ceiling_figures(ctx, SFT)
    assert (got["ceiling"], got["per_skill"], got["untrained"], got["source"]) == (0.711, {"colors": 0.9}, 0.37, "ceiling stage")
