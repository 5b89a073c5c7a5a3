"""Image-text sources: records by global index from WebDataset corpora, deterministic batches by
step (independent of the rank count), bad records skipped and counted, fixed and any-res shapes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from megatron_xomni.data import CorpusWriter, ImagePreprocessConfig
from megatron_xomni.data.corpus_source import BatchShape, CorpusSource, image_text_source
from megatron_xomni.data.preprocess import target_size

SIZES = [(48, 64), (64, 64), (80, 40), (40, 96), (64, 48), (72, 72), (56, 88), (96, 64), (64, 112), (50, 50)]


def _image(i, hw):
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((hw[1], hw[0]), Image.Resampling.NEAREST)  # blocky, not noise


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _corpus(path):
    """10 good records (meta i = 0..9) and 3 planted bad ones, 4 records per shard."""
    originals = {i: _image(i, hw) for i, hw in enumerate(SIZES)}
    with CorpusWriter(path, samples_per_shard=4, validate=False) as w:
        for i, img in originals.items():
            w.add(_png(img), f"caption {i}", {"i": i})
            if i == 2:
                w.add(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt png", {"i": -1})
            if i == 5:
                w.add(_png(_image(99, (32, 32))), "   ", {"i": -2})  # empty caption
            if i == 7:
                w.add(_png(_image(98, (20, 20))), "tiny image", {"i": -3})  # refused by the any-res rules only
    return originals


def _expected(originals, i, hw):
    arr = np.asarray(ImageOps.fit(originals[i], (hw[1], hw[0]), method=Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def test_a_pass_reads_every_good_record_and_counts_the_bad_ones_once(tmp_path):
    originals = _corpus(tmp_path / "c")
    src = CorpusSource(tmp_path / "c", seed=1)
    assert src.num_records == 13 and len(src.shards) == 4
    shape = BatchShape.fixed(32)
    batch = src.gather(range(13), shape)
    ids = [m["i"] for m in batch["metas"]]
    assert set(ids) == set(range(10)) | {-3}  # the 20x20 image is fine for fixed squares
    assert len(ids) == 13  # bad slots were filled by the next readable record
    assert src.report.skipped == {"corrupt": 1, "missing_caption": 1}
    for k, i in enumerate(ids):  # each slot holds its record's own image, caption and meta
        if i >= 0:
            torch.testing.assert_close(batch["pixels"][k], _expected(originals, i, (32, 32)), rtol=0, atol=0)
            assert batch["prompts"][k] == f"caption {i}"
    src.gather(range(13, 26), shape)  # the second pass: the same bad records are not counted again
    assert src.report.skipped == {"corrupt": 1, "missing_caption": 1}
    second = [m["i"] for m in src.gather(range(13, 26), shape)["metas"]]
    assert second != ids  # a new order each pass


def test_batches_do_not_depend_on_rank_count_or_reading_order(tmp_path):
    _corpus(tmp_path / "c")
    shape = BatchShape.fixed(32)
    one = CorpusSource(tmp_path / "c", seed=3)
    straight = [one.batch(s, 4, shape) for s in range(7)]
    two = [CorpusSource(tmp_path / "c", seed=3) for _ in range(2)]
    for step in [6, 2, 0, 5]:  # out of order: what a resumed run or another rank asks for
        halves = [two[r].batch(step, 4, shape, rank=r, world_size=2) for r in range(2)]
        assert torch.equal(torch.cat([h["pixels"] for h in halves]), straight[step]["pixels"])
        assert sum((h["prompts"] for h in halves), []) == straight[step]["prompts"]
        assert torch.equal(torch.cat([h["index"] for h in halves]), torch.arange(step * 4, step * 4 + 4))
    other_seed = CorpusSource(tmp_path / "c", seed=4)
    assert [other_seed.batch(s, 4, shape)["prompts"] for s in range(3)] != [b["prompts"] for b in straight[:3]]
    plain = CorpusSource(tmp_path / "c", shuffle=False)
    assert [m["i"] for m in plain.gather(range(4), shape)["metas"]] == [0, 1, 2, 3]  # writer order, slot 2 refilled


def test_any_res_batches_take_the_first_records_size(tmp_path):
    originals = _corpus(tmp_path / "c")
    rules = ImagePreprocessConfig.tiny()  # short side 64..., long <= 192, reject short < 32
    src = CorpusSource(tmp_path / "c", seed=2)
    shape = BatchShape.xomni(rules)
    for step in range(4):
        batch = src.batch(step, 3, shape)
        first = batch["metas"][0]["i"]
        hw = target_size(*SIZES[first], rules)
        assert tuple(batch["pixels"].shape) == (3, 3, *hw)
        for k, m in enumerate(batch["metas"]):
            torch.testing.assert_close(batch["pixels"][k], _expected(originals, m["i"], hw), rtol=0, atol=0)
    assert src.report.skipped.get("too_small") == 1  # the 20x20 image, under X-Omni's rules


def test_truncated_shard_and_corpus_without_manifest(tmp_path):
    _corpus(tmp_path / "c")
    shape = BatchShape.fixed(32)
    full = [m["i"] for m in CorpusSource(tmp_path / "c", seed=5).gather(range(13), shape)["metas"]]
    (tmp_path / "c" / "index.json").rename(tmp_path / "index.json.bak")
    scanned = CorpusSource(tmp_path / "c", seed=5)  # counts from scanning the shards
    assert scanned.num_records == 13
    assert [m["i"] for m in scanned.gather(range(13), shape)["metas"]] == full
    (tmp_path / "index.json.bak").rename(tmp_path / "c" / "index.json")
    last = sorted((tmp_path / "c").glob("shard-*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # the last shard (one record) loses its end
    cut = CorpusSource(tmp_path / "c", seed=5)
    ids = [m["i"] for m in cut.gather(range(13), shape)["metas"]]
    assert 9 not in ids and set(ids) == set(range(9)) | {-3}
    assert cut.report.skipped.get("truncated") == 1 and last.name in cut.report.broken_shards


def test_errors_and_the_world(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CorpusSource(tmp_path / "nowhere")
    with CorpusWriter(tmp_path / "bad", validate=False) as w:
        w.add(b"not an image at all", "caption", image_ext="png")
    with pytest.raises(ValueError, match="none of its 1 records is readable"):
        CorpusSource(tmp_path / "bad").gather([0], BatchShape.fixed(32))
    with pytest.raises(ValueError, match="multiple of 16"):
        BatchShape.fixed(30)
    from megatron_xomni.world import sample_world

    world = image_text_source("world", seed=4, size=48)
    batch = world.batch(3, 4, BatchShape.fixed(48), rank=1, world_size=2)
    want = [sample_world(i, seed=4, height=48, width=48) for i in (14, 15)]
    assert batch["prompts"] == [s.caption for s in want]
    ref = torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.float32) for s in want])).permute(0, 3, 1, 2) / 127.5 - 1
    assert torch.equal(batch["pixels"], ref)
