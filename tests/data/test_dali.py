"""DALI and Pillow decoding give the same tensors for the same file.

Skipped where nvidia.dali does not import. The GPU tests (nvJPEG, "mixed" backend) also need CUDA; the
CPU-backend tests run on any machine with DALI installed and check the same code path up to the device.
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from megatron_xomni.data import CorpusReader, ImagePreprocessConfig, make_decoder, write_corpus  # noqa: E402
from megatron_xomni.data.decode import DaliDecoder, DecodeFailed, PillowDecoder, decode_pillow  # noqa: E402

LEVEL = 2.0 / 255.0  # one grey level in the [-1, 1] range
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI GPU decoding needs a CUDA device")


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


DEVICES = [pytest.param("cpu", id="dali-cpu"), pytest.param("gpu", id="dali-gpu", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(200, 300), (700, 500), (2000, 1000)])
def test_png_same_tensor(device, hw):
    """PNG decodes losslessly on both sides: only the resize may differ, by at most one grey level."""
    cfg = ImagePreprocessConfig()
    data = _encode(_image(*hw), "PNG")
    dali = DaliDecoder(cfg, device=device)
    assert torch.equal(dali.decode_hwc(data).cpu(), torch.from_numpy(np.asarray(decode_pillow(data)).copy()))
    ref = PillowDecoder(cfg)(data)
    out = dali(data)
    assert out.device.type == ("cuda" if device == "gpu" else "cpu") and out.shape == ref.shape
    assert (out.cpu() - ref).abs().max() <= LEVEL + 1e-6
    assert dali.fallbacks == 0


def test_jpeg_cpu_backend_is_libjpeg_exact():
    """DALI's CPU backend is libjpeg-turbo with fancy upsampling, like Pillow: identical pixels."""
    data = _encode(_image(480, 640, 3), "JPEG")
    hwc = DaliDecoder(ImagePreprocessConfig(), device="cpu").decode_hwc(data).numpy()
    assert np.array_equal(hwc, np.asarray(decode_pillow(data)))


@needs_cuda
def test_jpeg_gpu_within_decoder_tolerance():
    """nvJPEG's IDCT may differ from libjpeg-turbo by a rounding level or two; the mean must stay tiny."""
    cfg = ImagePreprocessConfig()
    data = _encode(_image(480, 640, 3), "JPEG")
    dali = DaliDecoder(cfg, device="gpu")
    hwc = dali.decode_hwc(data).cpu().numpy().astype(np.int64)
    pil = np.asarray(decode_pillow(data), dtype=np.int64)
    assert hwc.shape == pil.shape
    assert np.abs(hwc - pil).mean() < 1.0 and np.abs(hwc - pil).max() <= 8
    diff = (dali(data).cpu() - PillowDecoder(cfg)(data)).abs()
    assert diff.mean() < LEVEL and diff.max() <= 9 * LEVEL


@pytest.mark.parametrize("device", DEVICES)
def test_bad_bytes_classified_like_pillow_and_reader_agrees(tmp_path, device):
    cfg = ImagePreprocessConfig.tiny()
    dec = DaliDecoder(cfg, device=device)
    png = _encode(_image(64, 96), "PNG")
    cases = [(b"", "empty_file"), (b"not an image", "undecodable"), (png[:300], "truncated")]
    for data, reason in cases:
        with pytest.raises(DecodeFailed) as info:
            dec(data)
        assert info.value.reason.value == reason
    assert dec(png).shape == (3, 64, 96)  # a failed record does not break the next one

    imgs = [_image(64, 96, i) for i in range(3)]
    write_corpus([(im, f"c{i}", {}) for i, im in enumerate(imgs)], tmp_path / "c")
    a = [s["pixels"].cpu() for s in CorpusReader(tmp_path / "c", cfg, decoder=dec)]
    b = [s["pixels"] for s in CorpusReader(tmp_path / "c", cfg, decoder="pillow")]
    assert len(a) == len(b) == 3
    assert all((x - y).abs().max() <= LEVEL + 1e-6 for x, y in zip(a, b))


@needs_cuda
def test_auto_picks_dali_on_gpu():
    assert make_decoder("auto", ImagePreprocessConfig.tiny()).name == "dali"
