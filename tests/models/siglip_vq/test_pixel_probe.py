"""The inspection pixel decoder: shapes, PSNR against closed forms, and a short real training run."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config
from megatron_xomni.models.siglip_vq.pixel_probe import (PixelDecoder, PixelDecoderConfig, image_grid, psnr,
                                                    tokenizer_features, train_pixel_decoder)


def test_psnr_matches_closed_form():
    target = torch.rand(4, 3, 16, 16) - 0.5  # [-0.5, 0.5]: no clamping involved
    # an offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: mse = 0.01 -> 20 dB exactly
    assert psnr(target + 0.2, target) == pytest.approx(20.0, abs=1e-4)
    # per-image PSNR is averaged: offsets 0.1 and 0.4 ([0, 1]: 0.05, 0.2) -> 26.0206 and 13.9794 dB
    pred = target.clone()
    pred[:2] += 0.1
    pred[2:] += 0.4
    want = (10 * math.log10(1 / 0.05 ** 2) + 10 * math.log10(1 / 0.2 ** 2)) / 2
    assert psnr(pred, target) == pytest.approx(want, abs=1e-3)


def test_decoder_output_shape_and_errors():
    dec = PixelDecoder(PixelDecoderConfig(in_dim=24, patch_size=16))
    out = dec(torch.randn(2, 3 * 5, 24), grid=(3, 5))
    assert out.shape == (2, 3, 48, 80)
    assert out.abs().max() <= 1.0
    with pytest.raises(ValueError, match="grid"):
        dec(torch.randn(2, 15, 24))  # 15 tokens are not a square grid
    with pytest.raises(ValueError, match="in_dim"):
        dec(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="perfect square"):
        PixelDecoderConfig(patch_size=8)


def test_save_load_roundtrip(tmp_path):
    dec = PixelDecoder(PixelDecoderConfig(in_dim=24))
    dec.save_pretrained(tmp_path)
    again = PixelDecoder.from_pretrained(tmp_path)
    x = torch.randn(1, 16, 24)
    assert torch.equal(dec(x), again(x))


def _world_pixels(samples):
    from megatron_xomni.data import ImagePreprocessConfig, preprocess

    return torch.stack([preprocess(s.image, ImagePreprocessConfig.tiny()) for s in samples])


@pytest.mark.slow
def test_short_training_beats_mean_image_and_untrained_decoder():
    from megatron_xomni.world import held_out_prompts, sample_world

    torch.manual_seed(0)
    train = _world_pixels([sample_world(i) for i in range(256)])
    test = _world_pixels(held_out_prompts(64))
    # a random tokenizer whose codebook is seeded from the data (train-mode forward fills the feature
    # buffer, then every unused code is re-seeded), so its codes partition real patch features
    tok = SiglipVQTokenizer(tokenizer_config("tiny"))
    tok.train()
    with torch.no_grad():
        tok(train)
    tok.quantizer.reseed_dead_codes(1, generator=torch.Generator().manual_seed(0))
    f_train, f_test = tokenizer_features(tok, train), tokenizer_features(tok, test)

    mean_psnr = psnr(train.mean(0, keepdim=True).expand_as(test), test)
    torch.manual_seed(1)
    dec = PixelDecoder(PixelDecoderConfig(in_dim=tok.cfg.adapter_dim, loss="l2"))
    with torch.no_grad():
        untrained_psnr = psnr(dec(f_test), test)
    losses = train_pixel_decoder(dec, f_train, train, steps=300, batch_size=16)
    with torch.no_grad():
        trained_psnr = psnr(dec(f_test), test)
    print(f"held-out PSNR: mean image {mean_psnr:.2f} dB, untrained {untrained_psnr:.2f} dB, trained {trained_psnr:.2f} dB")
    assert losses[-1] < losses[0]
    assert trained_psnr > mean_psnr + 1.0
    assert trained_psnr > untrained_psnr + 5.0
    grid = image_grid(test[:4], dec(f_test[:4]).detach(), columns=4)
    assert grid.size == (4 * 66, 2 * 66)
