"""Decoder noise out of GRPO's advantage: seeds, identical renders and common random numbers.

A fixed policy output (every sample of a group the same token sequence) through the real
renderer (tiny tokenizer + diffusion decoder): with one decoder seed per group every group's
rewards are equal and its advantages zero; with one seed per sample they are not - the spread
the policy cannot control that GRPO would otherwise credit to the tokens.
"""

import numpy as np
import pytest
import torch

from megatron_xomni.rl.decoder_noise import averaged_rewards, decoder_seed, rollout_decoder_seeds
from megatron_xomni.rl.grpo import group_advantages


@pytest.fixture(scope="module")
def renderer():
    from megatron_xomni.inference.render import Renderer
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    torch.manual_seed(0)
    return Renderer(SiglipVQTokenizer(tokenizer_config("tiny")), build_decoder(decoder_config("tiny", "image"), seed=1),
                    steps=2)


def _codes(groups: int, g: int):
    gen = torch.Generator().manual_seed(3)
    per_group = torch.randint(0, 64, (groups, 4, 4), generator=gen)
    return per_group.repeat_interleave(g, dim=0)  # identical sequences inside a group


def _brightness(images):
    """A continuous reward any decoder noise moves (mean pixel value in [0, 1])."""
    return [float(np.asarray(im, dtype=np.float64).mean() / 255.0) for im in images], None


def _decode_score(renderer, codes):
    """One decode of every rollout and its brightness scores, as averaged_rewards wants it."""
    def decode_score(seeds):
        images = renderer(codes, seeds)
        return (*_brightness(images), images)
    return decode_score


def test_identical_codes_and_seed_give_identical_images_other_seeds_differ(renderer):
    codes = _codes(1, 3)
    a = renderer(codes, [7, 7, 8])
    b = renderer(codes[:1], [7])  # alone, in another batch
    pix = [np.asarray(im) for im in a]
    assert np.array_equal(pix[0], pix[1])
    # rendered in another batch: float reductions differ in their last bits, at most one 8-bit level
    assert np.abs(pix[0].astype(int) - np.asarray(b[0]).astype(int)).max() <= 1
    assert np.abs(pix[0].astype(int) - pix[2].astype(int)).max() > 0


def test_seeds_are_a_pure_function_of_run_step_group_and_decode():
    assert decoder_seed(0, 5, 3) == decoder_seed(0, 5, 3)
    seen = {decoder_seed(r, s, g, k) for r in (0, 1) for s in (0, 1) for g in (0, 1) for k in (0, 1)}
    assert len(seen) == 16 and all(0 <= x < 2 ** 63 for x in seen)
    shared = rollout_decoder_seeds(0, 2, [0, 0, 1, 1], [0, 1, 2, 3], shared=True)
    assert shared[0] == shared[1] != shared[2] == shared[3]
    own = rollout_decoder_seeds(0, 2, [0, 0, 1, 1], [0, 1, 2, 3], shared=False)
    assert len(set(own)) == 4
    with pytest.raises(ValueError, match="non-negative"):
        decoder_seed(-1, 0, 0)


def test_shared_seed_removes_decoder_noise_from_a_fixed_policy_output(renderer):
    groups, g = 2, 4
    codes = _codes(groups, g)
    gids = [i // g for i in range(groups * g)]
    sids = list(range(groups * g))
    decode_score = _decode_score(renderer, codes)
    shared, _, _ = averaged_rewards(decode_score, gids, sids, run_seed=0, step=3, shared=True)
    indep, _, _ = averaged_rewards(decode_score, gids, sids, run_seed=0, step=3, shared=False)
    for q in range(groups):
        assert shared[q * g:(q + 1) * g].unique().numel() == 1
    assert torch.equal(group_advantages(shared, gids), torch.zeros(groups * g))
    spread = torch.stack([indep[q * g:(q + 1) * g].std() for q in range(groups)])
    assert (spread > 1e-4).all()
    assert (group_advantages(indep, gids).abs() > 0.1).any()
    # the two groups' codes differ, so a shared seed still separates them
    assert shared[0] != shared[g]


def test_k_decodes_average_the_rewards_of_k_seeded_renders(renderer):
    codes = _codes(1, 2)
    gids, sids = [0, 0], [0, 1]
    got, extras, first = averaged_rewards(_decode_score(renderer, codes), gids, sids,
                                          run_seed=4, step=1, shared=False, decodes=3)
    assert len(extras) == 3
    # written out: decode k renders sample j with seed (4, 1, group 0, k, j), in the same batch layout
    per_k = [_brightness(renderer(codes, [decoder_seed(4, 1, 0, k, j) for j in range(2)]))[0] for k in range(3)]
    want = torch.tensor(per_k, dtype=torch.float64).mean(0)
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert not torch.allclose(got.double(), want.flip(0), atol=1e-6)
    again = renderer(codes, [decoder_seed(4, 1, 0, 0, j) for j in range(2)])
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[1]))
    with pytest.raises(ValueError, match="decodes"):
        averaged_rewards(None, gids, sids, 0, 0, decodes=0)
