"""The sampler against a hand-written Euler integration of FLUX's shifted schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_xomni.models.flux_decoder import XOmniDecoder
from megatron_xomni.models.flux_decoder.sampling import initial_noise, sample, sample_from_codes, sampling_sigmas

from tests.models.flux_decoder.conftest import ADAPTER_DIM, random_features, tiny_decoder


def reference_sigmas(cfg, steps: int, seq_len: int) -> list[float]:
    """FLUX schedule from its definition: mu linear in token count, sigma' = e^mu / (e^mu + 1/sigma - 1)."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (seq_len - cfg.base_image_seq_len)
    sig = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sig] + [0.0]


def reference_sample(dec, feats, grid, seeds, steps, scale, prompts=None):
    """Plain Euler on dx/dsigma = v with CFG written out: v_u + s (v_c - v_u)."""
    b = feats.shape[0]
    x = initial_noise(dec, grid, seeds, b, "cpu", torch.float32)
    sig = reference_sigmas(dec.cfg, steps, grid[0] * grid[1])
    cond = dec.prompt_inputs(prompts, b, "cpu", torch.float32)
    empty = dec.prompt_inputs(None, b, "cpu", torch.float32)
    with torch.no_grad():
        for s0, s1 in zip(sig[:-1], sig[1:]):
            v_c = dec.velocity(x, s0, feats, grid, cond)
            v = v_c
            if scale is not None:
                v_u = dec.velocity(x, s0, torch.zeros_like(feats), grid, empty)
                v = v_u + scale * (v_c - v_u)
            x = x + (s1 - s0) * v
    return x


def test_schedule_is_fluxs_resolution_shift():
    dec = tiny_decoder("image")
    for steps, seq in [(28, 4096), (8, 16), (4, 6)]:
        ours = sampling_sigmas(dec.cfg, steps, seq).tolist()
        np.testing.assert_allclose(ours, reference_sigmas(dec.cfg, steps, seq), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["image", "text"])
def test_sampler_matches_reference_euler_without_and_with_guidance(variant):
    dec = tiny_decoder(variant)
    grid, steps = (2, 3), 4
    feats = random_features(2, *grid)
    prompts = ["a red circle", "two blue squares"] if variant == "text" else None
    ours = sample(dec, feats, grid, prompts=prompts, num_inference_steps=steps, generator=[3, 4], return_latents=True)
    # guidance scale 1 is "no guidance" and also what the CFG formula gives at s = 1
    ref_none = reference_sample(dec, feats, grid, [3, 4], steps, None, prompts)
    ref_one = reference_sample(dec, feats, grid, [3, 4], steps, 1.0, prompts)
    torch.testing.assert_close(ours, ref_none, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref_one, rtol=1e-5, atol=1e-5)
    guided = sample(dec, feats, grid, prompts=prompts, num_inference_steps=steps, generator=[3, 4],
                    guidance_scale=3.0, return_latents=True)
    torch.testing.assert_close(guided, reference_sample(dec, feats, grid, [3, 4], steps, 3.0, prompts), rtol=1e-5, atol=1e-5)
    assert (guided - ours).abs().max() > 1e-3  # guidance does something


def test_seeds_are_per_sample_and_reproducible():
    dec = tiny_decoder("image")
    grid = (3, 2)
    feats = random_features(3, *grid)
    batch = sample(dec, feats, grid, num_inference_steps=3, generator=[11, 12, 13])
    assert batch.shape == (3, 3, 48, 32)  # any token grid: h*16 x w*16 pixels
    assert torch.equal(batch, sample(dec, feats, grid, num_inference_steps=3, generator=[11, 12, 13]))
    alone = sample(dec, feats[1:2], grid, num_inference_steps=3, generator=[12])
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-5)  # independent of batch mates
    assert (batch[0] - batch[2]).abs().max() > 1e-3
    assert torch.equal(sample(dec, feats, grid, num_inference_steps=3, generator=11),
                       sample(dec, feats, grid, num_inference_steps=3, generator=[11, 12, 13]))


@pytest.mark.parametrize("variant", ["image", "text"])
def test_save_load_round_trip_gives_identical_samples(tmp_path, variant):
    dec = tiny_decoder(variant)
    grid = (2, 2)
    feats = random_features(2, *grid)
    prompts = ["x", "y"] if variant == "text" else None
    before = sample(dec, feats, grid, prompts=prompts, num_inference_steps=3, generator=5, guidance_scale=2.0)
    dec.save_pretrained(tmp_path / "export")
    again = XOmniDecoder.from_pretrained(tmp_path / "export", variant=variant)
    after = sample(again, feats, grid, prompts=prompts, num_inference_steps=3, generator=5, guidance_scale=2.0)
    assert torch.equal(before, after)


def test_sampler_bad_inputs():
    dec = tiny_decoder("image")
    feats = random_features(1, 2, 2)
    with pytest.raises(ValueError, match="adapter_dim"):
        sample(dec, torch.randn(1, 4, ADAPTER_DIM + 8), (2, 2))
    with pytest.raises(ValueError, match="does not match"):
        sample(dec, feats, (2, 3))
    with pytest.raises(ValueError, match=r"\[B, h\*w, adapter_dim\]"):
        sample(dec, feats[0], (2, 2))
    with pytest.raises(ValueError, match="one per sample"):
        sample(dec, feats, (2, 2), generator=[1, 2])
    with pytest.raises(ValueError, match="takes no prompts"):
        sample(dec, feats, (2, 2), prompts=["a cat"])


class _FakeTokenizerCfg:
    patch_size, codebook_size, adapter_dim = 16, 8, ADAPTER_DIM


class _TableTokenizer:
    """Stands in for SiglipVQTokenizer.decode_features: a fixed table lookup (independent reference)."""

    cfg = _FakeTokenizerCfg()
    table = torch.randn(8, ADAPTER_DIM, generator=torch.Generator().manual_seed(0))

    def decode_features(self, codes):
        return self.table[codes.flatten(1)]


def test_sample_from_codes_uses_the_tokenizer_features_and_grid():
    dec = tiny_decoder("image")
    tok = _TableTokenizer()
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    ours = sample_from_codes(dec, tok, codes, num_inference_steps=2, generator=1)
    assert torch.equal(ours, sample(dec, tok.table[codes.flatten(1)], (2, 3), num_inference_steps=2, generator=1))
    with pytest.raises(ValueError, match="integer"):
        sample_from_codes(dec, tok, codes.float())
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        sample_from_codes(dec, tok, codes + 5)
    with pytest.raises(ValueError, match="integer \\[B, h, w\\]"):
        sample_from_codes(dec, tok, codes.flatten(1))


def test_decoder_renders_a_finer_tokenizer_grid_through_the_fold():
    """A patch-8 tokenizer's 8x8 codes reach the 16 px decoder as 4x4 tokens of 2x2 concatenated features:
    decoder token (1, 2) holds codes (2..3, 4..5), the image is 64 px, a patch mismatch is refused."""
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.flux_decoder.config import check_decoder_patch, decoder_adapter_dim
    from megatron_xomni.models.flux_decoder.sampling import features_for_decoder
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    torch.manual_seed(0)
    tok = SiglipVQTokenizer(tokenizer_config("tiny", patch_size=8, pos_grid=8)).eval()
    dim = decoder_adapter_dim(tok.cfg.adapter_dim, 8)
    assert dim == 4 * tok.cfg.adapter_dim
    dec = build_decoder(decoder_config("tiny", "image", adapter_dim=dim, tokenizer_patch=8), seed=0).eval()
    codes = torch.randint(0, tok.cfg.codebook_size, (2, 8, 8))
    feats, grid = features_for_decoder(tok, codes, dec.cfg)
    assert grid == (4, 4) and feats.shape == (2, 16, dim)
    per_code = tok.decode_features(codes).reshape(2, 8, 8, -1)
    torch.testing.assert_close(feats[:, 1 * 4 + 2], torch.cat([per_code[:, 2, 4], per_code[:, 2, 5], per_code[:, 3, 4],
                                                               per_code[:, 3, 5]], -1), rtol=0, atol=0)
    out = sample_from_codes(dec, tok, codes, num_inference_steps=2, generator=0)
    assert out.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="patch 16 px != the 8 px patch"):
        check_decoder_patch(16, dec.cfg)
    with pytest.raises(ValueError, match="does not divide"):
        check_decoder_patch(6)
