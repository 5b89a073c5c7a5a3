"""X-Omni any-resolution preprocessing: sizes against hand-computed cases, pixels against Pillow directly."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_xomni.data.preprocess import (
    ImagePreprocessConfig,
    ImageRejected,
    check_size,
    preprocess,
    resize_uint8_tensor,
    target_size,
)
from megatron_xomni.data.report import SkipReason

X = ImagePreprocessConfig()  # X-Omni defaults
TINY = ImagePreprocessConfig.tiny()


# (h, w) -> (H, W), each worked out by hand from the rule in the module docstring
@pytest.mark.parametrize(
    "hw, expected",
    [
        ((200, 300), (384, 576)),  # short 200 < 384: x1.92 -> 384 x 576 exactly
        ((300, 200), (576, 384)),  # same, portrait
        ((2000, 1000), (1152, 576)),  # no upscale (short 1000 >= 384); long capped: x0.576
        ((500, 700), (496, 704)),  # no scaling; 31.25 -> 31, 43.75 -> 44
        ((1000, 1000), (992, 992)),  # 62.5 is a tie: Python round -> 62 (even)
        ((392, 500), (384, 496)),  # 24.5 tie -> 24
        ((408, 500), (416, 496)),  # 25.5 tie -> 26
        ((350, 1000), (384, 1104)),  # x384/350: long 1097.14 -> 68.57 -> 69 * 16
        ((128, 384), (384, 1152)),  # aspect exactly 3 is accepted; x3
        ((384, 384), (384, 384)),
        ((4000, 3000), (1152, 864)),  # x0.288: 3000 -> 864
    ],
)
def test_target_size_xomni(hw, expected):
    assert target_size(*hw, X) == expected


def test_target_size_tiny_and_cap_conflict():
    assert target_size(40, 100, TINY) == (64, 160)  # x1.6, long 160 <= 192
    assert target_size(300, 200, TINY) == (192, 128)  # long capped: x0.64
    # min_short * max_aspect > max_long: the long-side cap is applied last and wins
    cfg = ImagePreprocessConfig(min_short=64, max_long=128, multiple=16, min_short_reject=32)
    assert target_size(40, 120, cfg) == (48, 128)  # 64 x 192 -> x2/3 -> 42.67 -> 3 * 16


@pytest.mark.parametrize(
    "hw, cfg, reason",
    [
        ((100, 500), X, SkipReason.TOO_SMALL),  # short side checked first
        ((150, 500), X, SkipReason.ASPECT_RATIO),  # 3.33 > 3
        ((127, 200), X, SkipReason.TOO_SMALL),
        ((0, 200), X, SkipReason.ZERO_SIZE),
        ((40, 200), TINY, SkipReason.ASPECT_RATIO),
        ((31, 60), TINY, SkipReason.TOO_SMALL),
    ],
)
def test_rejections(hw, cfg, reason):
    assert check_size(*hw, cfg) == reason
    with pytest.raises(ImageRejected) as info:
        target_size(*hw, cfg)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_outputs_obey_bounds_over_many_sizes():
    """Every accepted size lands on multiples of 16 inside [384, 1152] (no cap conflict with defaults)."""
    rng = np.random.default_rng(0)
    for h, w in rng.integers(128, 5000, size=(2000, 2)):
        if max(h, w) / min(h, w) > 3:
            continue
        H, W = target_size(int(h), int(w), X)
        assert H % 16 == 0 and W % 16 == 0
        assert min(H, W) >= 384 and max(H, W) <= 1152
        if min(h, w) >= 384 and max(h, w) <= 1152:  # in range: only rounding, at most half a patch
            assert abs(H - h) <= 8 and abs(W - w) <= 8


def test_config_validation():
    with pytest.raises(ValueError, match="multiples"):
        ImagePreprocessConfig(min_short=100)
    with pytest.raises(ValueError, match="exceed"):
        ImagePreprocessConfig(min_short=512, max_long=256)
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocessConfig(resample="nearest")


def _pillow_reference(img: Image.Image, size_hw):
    """What preprocess must equal: Pillow bicubic resize, then (x / 255 - 0.5) / 0.5, channels first."""
    H, W = size_hw
    arr = np.asarray(img.convert("RGB").resize((W, H), Image.BICUBIC), dtype=np.float64) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1)


@pytest.mark.parametrize("size_wh, cfg, expected_hw", [((70, 50), TINY, (64, 96)), ((300, 200), X, (384, 576))])
def test_preprocess_pixels_match_pillow(size_wh, cfg, expected_hw):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))
    out = preprocess(img, cfg)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, *expected_hw)
    assert out.min() >= -1.0 and out.max() <= 1.0
    ref = _pillow_reference(img, expected_hw)
    assert torch.allclose(out.double(), ref, atol=1e-6)
    # extremes map to the ends of the range
    white = preprocess(Image.new("RGB", size_wh, (255, 255, 255)), cfg)
    black = preprocess(Image.new("RGB", size_wh, (0, 0, 0)), cfg)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_preprocess_converts_modes_and_rejects():
    gray = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8), "L")
    out = preprocess(gray, TINY)
    assert out.shape == (3, 64, 64)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    with pytest.raises(ImageRejected) as info:
        preprocess(Image.new("RGB", (200, 40)), TINY)
    assert info.value.reason == SkipReason.ASPECT_RATIO


@pytest.mark.parametrize("hw, size", [((200, 300), (384, 576)), ((700, 500), (704, 496)), ((48, 64), (192, 256))])
def test_tensor_resize_matches_pillow(hw, size):
    """The GPU path's resize (torch, any device) reproduces Pillow bicubic within one grey level."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BICUBIC)).astype(np.int64)
    out = resize_uint8_tensor(torch.from_numpy(arr).permute(2, 0, 1), size).permute(1, 2, 0).numpy().astype(np.int64)
    diff = np.abs(out - ref)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01  # off-by-one only at float rounding ties


def test_cpu_and_tensor_normalisation_paths_agree_bitwise():
    """preprocess() normalises in numpy, the DALI path with normalize_uint8 in torch: same float32 bits."""
    from megatron_xomni.data.preprocess import normalize_uint8

    arr = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    for cfg in (TINY, ImagePreprocessConfig(min_short=64, max_long=192, min_short_reject=32, mean=0.45, std=0.27)):
        assert torch.equal(preprocess(Image.fromarray(arr), cfg), normalize_uint8(torch.from_numpy(arr).permute(2, 0, 1), cfg))
