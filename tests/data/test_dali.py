"""DALI (GPU) and Pillow (CPU) decoding give the same tensors. Runs only where nvidia.dali and CUDA exist."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
if not torch.cuda.is_available():
    pytest.skip("DALI decoding needs a CUDA device", allow_module_level=True)

from megatron_xomni.data import CorpusReader, ImagePreprocessConfig, make_decoder, write_corpus  # noqa: E402
from megatron_xomni.data.decode import DaliDecoder, DecodeFailed, PillowDecoder, decode_pillow  # noqa: E402

LEVEL = 2.0 / 255.0  # one grey level in the [-1, 1] range


def _image(h, w, seed=0):
    """Smooth gradients plus mild noise: realistic enough for JPEG, sharp enough to test the resize."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (h + w)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("hw", [(200, 300), (700, 500), (2000, 1000)])
def test_png_same_tensor(hw):
    """PNG decodes losslessly on both sides: only the resize differs, by at most one grey level."""
    cfg = ImagePreprocessConfig()
    data = _encode(_image(*hw), "PNG")
    ref = PillowDecoder(cfg)(data)
    out = DaliDecoder(cfg)(data)
    assert out.is_cuda and out.shape == ref.shape
    diff = (out.cpu() - ref).abs()
    assert diff.max() <= LEVEL + 1e-6


def test_jpeg_same_tensor_within_decoder_tolerance():
    """nvJPEG and libjpeg-turbo may differ by an IDCT rounding level or two; the mean must stay tiny."""
    cfg = ImagePreprocessConfig()
    data = _encode(_image(480, 640, 3), "JPEG")
    dali = DaliDecoder(cfg)
    hwc = dali.decode_hwc(data).cpu().numpy().astype(np.int64)
    pil = np.asarray(decode_pillow(data), dtype=np.int64)
    assert hwc.shape == pil.shape
    assert np.abs(hwc - pil).mean() < 1.0 and np.abs(hwc - pil).max() <= 8
    diff = (dali(data).cpu() - PillowDecoder(cfg)(data)).abs()
    assert diff.mean() < LEVEL and diff.max() <= 9 * LEVEL


def test_dali_bad_bytes_are_classified_like_pillow(tmp_path):
    cfg = ImagePreprocessConfig.tiny()
    dec = DaliDecoder(cfg)
    for data, reason in [(b"", "empty_file"), (b"not an image", "undecodable")]:
        with pytest.raises(DecodeFailed) as info:
            dec(data)
        assert info.value.reason.value == reason
    assert make_decoder("auto", cfg).name == "dali"
    imgs = [_image(64, 96, i) for i in range(3)]
    write_corpus([(im, f"c{i}", {}) for i, im in enumerate(imgs)], tmp_path / "c")
    a = [s["pixels"].cpu() for s in CorpusReader(tmp_path / "c", cfg, decoder="dali")]
    b = [s["pixels"] for s in CorpusReader(tmp_path / "c", cfg, decoder="pillow")]
    assert len(a) == len(b) == 3
    assert all((x - y).abs().max() <= LEVEL + 1e-6 for x, y in zip(a, b))
