"""Planted bad records: each is counted under its reason, every good record is kept, nothing crashes."""
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_xomni.data import CorpusReader, CorpusWriter, ImagePreprocessConfig, SkipReport, iter_tar_records
from megatron_xomni.data.decode import DecodeFailed, PillowDecoder, probe_header_size

TINY = ImagePreprocessConfig.tiny()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(h, w, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _zero_width_png() -> bytes:
    """A PNG whose IHDR declares width 0 (valid chunk CRCs), built by hand from the PNG spec."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 0, 64, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _corrupt_png() -> bytes:
    """Valid header, damaged compressed pixel stream."""
    data = bytearray(_png(_noise(64, 64, 7)))
    for i in range(120, len(data) - 40, 5):
        data[i] ^= 0x5A
    return bytes(data)


# (name, image bytes, caption, meta, expected reason or None for good)
def _planted():
    good = [(f"good{i}", _png(_noise(64, 64 + 16 * i, i)), f"good caption {i}", {"i": i}, None) for i in range(4)]
    bad = [
        ("corrupt", _corrupt_png(), "c", {}, "corrupt"),
        ("garbage", b"\x00\x01 these bytes are no image format", "c", {}, "undecodable"),
        ("empty", b"", "c", {}, "empty_file"),
        ("zero", _zero_width_png(), "c", {}, "zero_size"),
        ("aspect", _png(_noise(40, 200)), "c", {}, "aspect_ratio"),  # 5:1
        ("small", _png(_noise(20, 24)), "c", {}, "too_small"),
        ("nocap", _png(_noise(64, 64)), None, {}, "missing_caption"),
        ("blankcap", _png(_noise(64, 64)), "   \n", {}, "missing_caption"),
        ("badmeta", _png(_noise(64, 64)), "c", ["not", "a", "dict"], "bad_metadata"),
        ("cutimg", _png(_noise(64, 64, 9))[:300], "c", {}, "truncated"),
    ]
    # interleave so bad records sit between good ones
    return [good[0], *bad[:5], good[1], *bad[5:], good[2], good[3]]


def _write(out_dir, records, per_shard):
    with CorpusWriter(out_dir, samples_per_shard=per_shard, validate=False) as w:
        keys = [w.add(img, cap, meta, image_ext="png") for _, img, cap, meta, _ in records]
    return keys, w.manifest


def test_planted_bad_records_and_truncated_last_shard(tmp_path):
    records = _planted()  # 14 records in shard 0
    tail = [(f"tail{i}", _png(_noise(64, 64, 20 + i)), f"tail {i}", {}, None) for i in range(5)]
    keys, manifest = _write(tmp_path / "c", records + tail, per_shard=len(records))
    assert [s.count for s in manifest.shards] == [14, 5]

    # cut the last shard in the middle of the image of its third record (tail2)
    last = tmp_path / "c" / manifest.shards[1].name
    with tarfile.open(last) as tf:
        member = next(m for m in tf.getmembers() if m.name.startswith(keys[16]) and m.name.endswith(".png"))
    data = last.read_bytes()
    last.write_bytes(data[: member.offset_data + member.size // 2])

    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    samples = list(reader)
    report = reader.report

    expected_good = [k for k, r in zip(keys, records) if r[4] is None] + keys[14:16]  # tail0, tail1 survive the cut
    assert [s["key"] for s in samples] == expected_good
    expected = {}
    for r in records:
        if r[4] is not None:
            expected[r[4]] = expected.get(r[4], 0) + 1
    expected["truncated"] += 3  # tail2 (cut mid-image) + tail3, tail4 (lost, known from index.json)
    assert report.skipped == expected
    assert report.seen == manifest.num_samples == 19  # every record yielded or counted
    assert report.yielded == len(expected_good)
    assert set(report.broken_shards) == {manifest.shards[1].name}
    # captions / meta of the good records survive
    assert [s["caption"] for s in samples[:4]] == [f"good caption {i}" for i in range(4)]
    assert [s["meta"] for s in samples[:4]] == [{"i": i} for i in range(4)]

    # report: JSON round trip and readable text
    report.save(tmp_path / "skips.json")
    loaded = SkipReport.load(tmp_path / "skips.json")
    assert loaded.skipped == report.skipped and loaded.yielded == report.yielded
    assert json.loads((tmp_path / "skips.json").read_text())["seen"] == 19
    text = str(report)
    for reason in expected:
        assert reason in text


def test_shard_cut_between_records_and_without_manifest(tmp_path):
    recs = [(f"r{i}", _png(_noise(64, 64, i)), f"cap {i}", {}, None) for i in range(5)]
    keys, manifest = _write(tmp_path / "c", recs, per_shard=5)
    shard = tmp_path / "c" / manifest.shards[0].name
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    # cut exactly after the data of record 2's last member: tarfile itself reports no error here
    last_of_2 = [m for m in members if m.name.startswith(keys[2])][-1]
    shard.write_bytes(shard.read_bytes()[: last_of_2.offset_data + -(-last_of_2.size // 512) * 512])

    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    assert [s["key"] for s in reader] == keys[:2]
    # record 2 cannot be told complete without the end-of-archive marker; 3 and 4 are gone
    assert reader.report.skipped == {"truncated": 3}

    # without index.json the lost records cannot be known, but the break is still counted
    (tmp_path / "c" / "index.json").unlink()
    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    assert [s["key"] for s in reader] == keys[:2]
    assert reader.report.skipped == {"truncated": 1}

    # a shard cut inside the header of record 1, and a garbage file posing as a shard, never crash the
    # reader (record 0 is counted: without the end-of-archive marker it cannot be trusted to be complete)
    shard.write_bytes(shard.read_bytes()[: members[3].offset + 100])
    (tmp_path / "c" / "zz.tar").write_bytes(b"definitely not a tar" * 10)
    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    assert list(reader) == []
    assert reader.report.skipped == {"truncated": 2}
    assert len(reader.report.broken_shards) == 2


def test_missing_image_field(tmp_path):
    """A record with a caption but no image member (written with plain tarfile, independent of our writer)."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for name, body in [("a.txt", b"orphan caption"), ("b.png", _png(_noise(64, 64))), ("b.txt", b"fine")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    keys = [(pos, key, err) for pos, key, _, err in iter_tar_records(shard)]
    assert keys == [(0, "a", None), (1, "b", None)]
    reader = CorpusReader(shard, TINY, decoder="pillow")
    assert [s["caption"] for s in reader] == ["fine"]
    assert reader.report.skipped == {"missing_image": 1}


def test_decoder_reasons_direct():
    dec = PillowDecoder(TINY)
    cases = {
        b"": "empty_file",
        b"random bytes": "undecodable",
        _zero_width_png(): "zero_size",
        _corrupt_png(): "corrupt",
        _png(_noise(64, 64))[:200]: "truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeFailed) as info:
            dec(data)
        assert info.value.reason.value == reason, (reason, str(info.value))
    # truncated JPEG too
    buf = io.BytesIO()
    _noise(64, 64).save(buf, format="JPEG")
    with pytest.raises(DecodeFailed) as info:
        dec(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert info.value.reason.value == "truncated"
    assert probe_header_size(buf.getvalue())[1:] == (64, 64)
