"""The tiny preset's auxiliary pixel loss against formulas written here."""

import torch

from megatron_xomni.training.siglip_vq_aux import PixelHead, foreground_fraction, weighted_pixel_loss


def _scene():
    """A flat background (-0.5) with one 5x6 px object (0.8) at rows 3..7, cols 9..14 of a 16 px image."""
    px = torch.full((2, 3, 16, 16), -0.5)
    px[0, :, 3:8, 9:15] = 0.8
    return px


def test_foreground_fraction_counts_object_pixels_per_token():
    frac = foreground_fraction(_scene(), 8).reshape(2, 2, 2)
    # token (0, 1) covers rows 0..7, cols 8..15: the whole 5x6 object = 30 of its 64 pixels
    assert torch.allclose(frac[0], torch.tensor([[0.0, 30 / 64], [0.0, 0.0]]))
    assert frac[1].abs().max() == 0  # the empty image has no foreground


def test_weighted_pixel_loss_matches_direct_weighting():
    px = _scene()
    g = torch.Generator().manual_seed(0)
    pred = px + 0.3 * torch.randn(px.shape, generator=g)
    alpha = 4.0
    w = torch.ones(2, 16, 16)
    w[0, 0:8, 8:16] = 1 + alpha * 30 / 64  # every pixel of token (0, 1) of image 0
    err = (pred - px).pow(2).mean(1)
    want = (err * w).sum() / w.sum()
    torch.testing.assert_close(weighted_pixel_loss(pred, px, 8, alpha), want)
    torch.testing.assert_close(weighted_pixel_loss(pred, px, 8, 0.0), err.mean())


def test_pixel_head_maps_token_features_to_their_pixels():
    head = PixelHead(in_dim=12, patch=8)
    out = head(torch.randn(3, 4 * 2, 12), (4, 2))
    assert out.shape == (3, 3, 32, 16)
