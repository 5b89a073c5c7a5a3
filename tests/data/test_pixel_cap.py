"""The pixel cap: images declaring more pixels than ImagePreprocessConfig.max_pixels (default 64 MP,
$XOMNI_MAX_IMAGE_PIXELS) are refused from their header, before any pixel is decoded, by every reader."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from megatron_xomni.data import CorpusReader, CorpusWriter, ImagePreprocessConfig, ImageRejected, preprocess
from megatron_xomni.data.decode import DecodeFailed, PillowDecoder, decode_pillow, open_image_file
from megatron_xomni.data.preprocess import MAX_PIXELS_ENV

TINY = ImagePreprocessConfig.tiny()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one empty IDAT (a few dozen bytes on disk)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def header_only_ppm(width: int, height: int) -> bytes:
    """A format the header probe does not parse: Pillow reads the size, the cap is checked after that."""
    return f"P6\n{width} {height}\n255\n".encode()


def _png(h, w, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decode fails the test: the cap must act on the header alone."""
    def load(self, *a, **k):
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(Image.Image, "load", load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_default_cap_is_64_megapixels(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert ImagePreprocessConfig().max_pixels == 64_000_000 == TINY.max_pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert ImagePreprocessConfig().max_pixels == ImagePreprocessConfig.tiny().max_pixels == 1000
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_PIXELS_ENV):
        ImagePreprocessConfig()


@pytest.mark.parametrize("data", [header_only_png(20000, 20000), header_only_png(8001, 8000),
                                  header_only_ppm(20000, 20000), header_only_ppm(8001, 8000)],
                         ids=["png_400MP", "png_64MP+", "ppm_400MP", "ppm_64MP+"])
def test_header_declaring_too_many_pixels_is_refused_undecoded(data, no_decoding):
    with pytest.raises(DecodeFailed) as info:
        PillowDecoder(TINY)(data)
    assert info.value.reason.value == "too_large"
    msg = str(info.value)
    assert "above the cap of 64,000,000" in msg and MAX_PIXELS_ENV in msg and "\n" not in msg
    with pytest.raises(DecodeFailed):
        decode_pillow(data)


def test_cap_is_configurable():
    data = _png(128, 128)
    assert PillowDecoder(ImagePreprocessConfig(max_pixels=128 * 128))(data).shape == (3, 384, 384)
    with pytest.raises(DecodeFailed) as info:
        PillowDecoder(ImagePreprocessConfig(max_pixels=128 * 128 - 1))(data)
    assert info.value.reason.value == "too_large"


def test_preprocess_of_a_lazily_opened_image_checks_before_decoding(no_decoding):
    img = Image.open(io.BytesIO(header_only_ppm(9000, 8000)))
    with pytest.raises(ImageRejected) as info:
        preprocess(img, TINY)
    assert info.value.reason.value == "too_large"


def test_open_image_file_names_the_file(tmp_path, no_decoding):
    path = tmp_path / "huge.png"
    path.write_bytes(header_only_png(20000, 20000))
    assert path.stat().st_size < 100
    with pytest.raises(DecodeFailed, match=rf"^image {path}: image 20000x20000 has 400,000,000 pixels"):
        open_image_file(path)


def test_writers_and_reader_count_too_large_records(tmp_path):
    huge = header_only_png(20000, 20000)
    # writer with validation: refused and counted (encoded bytes and PIL images alike)
    with CorpusWriter(tmp_path / "w", max_pixels=100 * 100) as w:
        assert w.add(huge, "huge", {}) is None
        assert w.add(Image.new("RGB", (101, 100)), "over a small cap", {}) is None
        assert w.add(_png(64, 64), "fine", {}) is not None
    assert w.report.skipped == {"too_large": 2}

    # a corpus written without validation (as it may come from elsewhere): the reader counts it
    with CorpusWriter(tmp_path / "c", validate=False) as w:
        for i, data in enumerate([_png(64, 64, 1), huge, _png(64, 64, 2)]):
            w.add(data, f"caption {i}", {}, image_ext="png")
    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    assert [s["caption"] for s in reader] == ["caption 0", "caption 2"]
    assert reader.report.skipped == {"too_large": 1}
