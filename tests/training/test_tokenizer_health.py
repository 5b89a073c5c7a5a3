"""Tokenizer-health numbers against values computed here by hand."""

import math

import numpy as np
import torch

from megatron_xomni.data.world_source import world_image_labels as image_labels
from megatron_xomni.data.world_source import world_token_colours as token_colour_labels
from megatron_xomni.training.tokenizer_health import caption_gap_pct, logistic_probe, usage


def test_usage_and_perplexity_match_the_histogram():
    codes = torch.tensor([[0, 0, 0, 1], [1, 2, 0, 5]])  # counts 4, 2, 1, 0, 0, 1 of a codebook of 8
    p = np.array([4, 2, 1, 1]) / 8
    got = usage(codes, 8)
    assert got["distinct"] == 4 and got["usage"] == 4 / 8
    assert abs(got["perplexity"] - math.exp(-(p * np.log(p)).sum())) < 1e-9


def test_caption_gap_is_relative_to_the_right_image_loss():
    assert abs(caption_gap_pct({"loss": 0.25, "loss_shuffled": 0.40}) - 60.0) < 1e-9
    assert caption_gap_pct({"loss": 1.0, "loss_shuffled": 0.99}) < 0


def test_linear_probe_separates_what_is_linear_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 10, generator=g)
    assert logistic_probe(x[:300], y[:300], x[300:], y[300:]) > 0.95
    noise = torch.randn(400, 10, generator=g)
    assert logistic_probe(noise[:300], y[:300], noise[300:], y[300:]) < 0.45  # chance is 0.25


def test_labels_of_a_world_image():
    from megatron_xomni.world import held_out_prompts
    from megatron_xomni.world.vocab import COLORS, SHAPES

    s = held_out_prompts(1, seed=3, skills=["single_object"])[0]
    (obj,) = s.meta["objects"]
    lab = token_colour_labels([s], 8)[0].reshape(8, 8)
    x0, y0, x1, y1 = obj["box"]
    centre = lab[((y0 + y1) // 2) // 8, ((x0 + x1) // 2) // 8]
    assert centre == COLORS.index(obj["color"])
    assert (lab == -2).sum() > 0 and set(lab.flatten().tolist()) <= {-2, -1, COLORS.index(obj["color"])}
    shape, count, pos = image_labels([s])
    assert shape[0] == SHAPES.index(obj["shape"]) and count[0] == -1 and 0 <= pos[0] < 9
