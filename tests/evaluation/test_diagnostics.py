"""The reward diagnostics against values worked out by hand on small reward tables."""

import pytest

from megatron_xomni.evaluation.diagnostics import best_of_n, noise_floor, per_skill_metrics

# R[prompt][sample][decoder seed]
TABLE = [[[1.0, 0.0], [1.0, 1.0]],
         [[0.0, 0.0], [0.5, 1.0]]]


def test_noise_floor_matches_the_hand_computed_split():
    got = noise_floor(TABLE)
    # prompt 0: values {1,0,1,1}: Var 0.1875 = Var_j(m = .5, 1) 0.0625 + mean_j Var_k (0.25, 0) 0.125
    # prompt 1: values {0,0,.5,1}: Var 0.171875 = Var_j(m = 0, .75) 0.140625 + mean_j Var_k (0, .0625) 0.03125
    assert got["within_total"] == pytest.approx((0.1875 + 0.171875) / 2, abs=1e-12)
    assert got["within_tokens"] == pytest.approx((0.0625 + 0.140625) / 2, abs=1e-12)
    assert got["within_decoder"] == pytest.approx((0.125 + 0.03125) / 2, abs=1e-12)
    assert got["decoder_share_within"] == pytest.approx(10 / 23, abs=1e-12)
    # all 8 values: mean 0.5625, mean square 0.53125 -> Var 0.21484375; prompt means .75, .375 -> 0.03515625
    assert got["overall_total"] == pytest.approx(0.21484375, abs=1e-12)
    assert got["between_prompts"] == pytest.approx(0.03515625, abs=1e-12)
    assert got["decoder_share_overall"] == pytest.approx(4 / 11, abs=1e-12)
    # one seed per group: prompt 0 seeds give samples (1, 1) and (0, 1): Var_j 0 and .25 -> .125;
    # prompt 1: (0, .5) and (0, 1): .0625 and .25 -> .15625. Residuals d: prompt 0 (.5, 0), (-.5, 0)
    # -> .0625; prompt 1 (0, -.25), (0, .25) -> .015625.
    assert got["shared_seed_within_total"] == pytest.approx((0.125 + 0.15625) / 2, abs=1e-12)
    assert got["shared_seed_within_decoder"] == pytest.approx((0.0625 + 0.015625) / 2, abs=1e-12)
    assert got["decoder_share_within_shared_seed"] == pytest.approx(5 / 18, abs=1e-12)
    assert got["mean_reward"] == pytest.approx(0.5625, abs=1e-12)


def test_a_seed_independent_decoder_has_no_noise_floor():
    got = noise_floor([[[0.2, 0.2, 0.2], [0.8, 0.8, 0.8]], [[0.1, 0.1, 0.1], [0.4, 0.4, 0.4]]])
    assert got["decoder_share_within"] <= 1e-12 and got["decoder_share_within_shared_seed"] <= 1e-12
    assert got["within_tokens"] == pytest.approx((0.09 + 0.0225) / 2, abs=1e-12)


def test_honest_best_of_n_rescores_the_pick_with_a_fresh_seed():
    select = [[0.2, 0.9, 0.9], [0.5, 0.1, 0.3]]
    fresh = [[0.4, 0.3, 0.8], [0.6, 0.0, 1.0]]
    got = best_of_n(select, fresh)
    assert got["naive"] == pytest.approx((0.9 + 0.5) / 2)
    assert got["honest"] == pytest.approx((0.3 + 0.6) / 2)  # the tie at 0.9 goes to sample 1
    assert got["n"] == 3


def test_per_skill_all_or_nothing_next_to_partial_credit():
    rows = [{"skill": "colors", "fraction": f} for f in (1.0, 0.5, 1.0, 0.0)]
    rows += [{"skill": "counting", "fraction": f} for f in (0.5, 0.5)]
    got = per_skill_metrics(rows)
    assert got["accuracy"] == {"colors": 0.5, "counting": 0.0}
    assert got["partial_credit"] == {"colors": 0.625, "counting": 0.5}
    assert got["overall_accuracy"] == pytest.approx(0.25)
    assert got["overall_partial_credit"] == pytest.approx(0.5625)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="decoder seeds >= 2"):
        noise_floor([[[1.0], [0.0]]])
    with pytest.raises(ValueError, match="equal"):
        best_of_n([[1.0, 0.0]], [[1.0]])
    with pytest.raises(ValueError, match="outside"):
        per_skill_metrics([{"skill": "colors", "fraction": 1.5}])


def test_shared_seed_figures_read_only_the_decodes_whose_seed_the_group_shares():
    # decode 0 has one seed per sample; decodes 1 and 2 share a seed across the prompt's samples
    table = [[[0.9, 1.0, 0.0], [0.1, 1.0, 0.5]]]
    got = noise_floor(table, shared_from=1)
    # decode 1: (1, 1) -> Var 0; decode 2: (0, .5) -> .0625; mean .03125. Means over decodes 1-2: .5, .75
    # -> Var .015625; residuals (.5, .25) and (-.5, -.25) -> .015625 each.
    assert got["shared_seed_within_total"] == pytest.approx(0.03125, abs=1e-12)
    assert got["shared_seed_within_decoder"] == pytest.approx(0.015625, abs=1e-12)
    assert got["decoder_share_within_shared_seed"] == pytest.approx(0.5, abs=1e-12)
    assert got["shared_seed_decodes"] == 2
    import math

    assert math.isnan(noise_floor(table, shared_from=2)["decoder_share_within_shared_seed"])
