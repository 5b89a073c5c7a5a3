"""Write -> read round trips: every caption / meta kept, pixels equal to preprocess() of the source image."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_xomni.data import (
    CorpusReader,
    ImagePreprocessConfig,
    SkipReason,
    make_decoder,
    dali_available,
    preprocess,
    write_corpus,
    write_folder_corpus,
    write_jsonl_corpus,
    write_world_corpus,
)

TINY = ImagePreprocessConfig.tiny()


def _tar_members(path):
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def test_world_corpus_round_trip(tmp_path):
    from megatron_xomni.world import sample_world

    n, seed, h, w = 11, 3, 48, 80  # 48x80 -> tiny rules upscale to 64 x 112: the resize path is exercised
    manifest = write_world_corpus(tmp_path / "c", n, seed=seed, height=h, width=w, skills=["counting", "colors"], samples_per_shard=4)
    assert [s.count for s in manifest.shards] == [4, 4, 3]
    # the manifest agrees with what the tar files hold, counted independently; no tmp files remain
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["num_samples"] == n
    for s in index["shards"]:
        names = _tar_members(tmp_path / "c" / s["name"])
        assert len({m.split(".")[0] for m in names}) == s["count"]
        assert len(names) == 3 * s["count"]  # .png .json .txt per record

    reader = CorpusReader(tmp_path / "c", TINY, decoder="pillow")
    samples = list(reader)
    assert len(samples) == n and reader.report.yielded == n and reader.report.num_skipped == 0
    for i, s in enumerate(samples):
        src = sample_world(i, seed=seed, height=h, width=w, skill=["counting", "colors"][i % 2])
        assert s["caption"] == src.caption
        assert s["meta"]["objects"] == json.loads(json.dumps(src.meta["objects"]))
        assert s["meta"]["qa"] == [[q, a] for q, a in src.qa]
        assert s["meta"]["world"] == {"index": i, "seed": seed, "skill": ["counting", "colors"][i % 2]}
        assert s["pixels"].shape == (3, 64, 112)
        assert torch.equal(s["pixels"], preprocess(src.image, TINY))  # PNG is lossless: exact


def test_generic_writer_pil_and_encoded_bytes(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 60, 3), dtype=np.uint8)) for i in range(5)]
    jpeg = io.BytesIO()
    images[4].save(jpeg, format="JPEG", quality=90)
    records = [(images[i], f"caption {i} é", {"i": i, "tags": ["a", i]}) for i in range(4)]
    records.append((jpeg.getvalue(), "a jpeg", None))  # bytes are stored as given, meta None -> {}
    manifest = write_corpus(records, tmp_path / "c", samples_per_shard=2)
    assert manifest.num_samples == 5 and len(manifest.shards) == 3
    assert any(m.endswith(".jpg") for m in _tar_members(tmp_path / "c" / "shard-000002.tar"))

    samples = list(CorpusReader(tmp_path / "c", TINY, decoder="pillow"))
    assert [s["caption"] for s in samples] == [r[1] for r in records]
    assert [s["meta"] for s in samples] == [r[2] for r in records[:4]] + [{}]
    for img, s in zip(images[:4], samples):
        assert torch.equal(s["pixels"], preprocess(img, TINY))
    # the JPEG record equals preprocess() of the same bytes decoded by Pillow
    assert torch.equal(samples[4]["pixels"], preprocess(Image.open(io.BytesIO(jpeg.getvalue())), TINY))


def test_webdataset_library_reads_the_shards(tmp_path):
    """The shards are plain WebDataset: the webdataset library itself groups them into the same records."""
    import webdataset as wds

    write_world_corpus(tmp_path / "c", 6, seed=0, samples_per_shard=4)
    urls = [str(p) for p in sorted((tmp_path / "c").glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    got = [(r["__key__"], r["txt"].decode(), json.loads(r["json"])["world"]["index"], Image.open(io.BytesIO(r["png"])).size) for r in ds]
    ours = [(s["key"], s["caption"], s["meta"]["world"]["index"], s["pixels"].shape[1:][::-1]) for s in CorpusReader(tmp_path / "c", TINY, "pillow")]
    assert [g[:3] for g in got] == [o[:3] for o in ours] and len(got) == 6
    assert all(g[3] == (64, 64) for g in got)


def test_folder_and_jsonl_writers(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    imgs = {}
    for name in ["a.png", "sub/b.png", "c.jpg", "nocap.png", "bad.png"]:
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        imgs[name] = img
        img.save(src / name)
    for name in ["a", "sub/b", "c", "bad"]:
        (src / f"{name}.txt").write_text(f"caption of {name}\n")
    (src / "a.json").write_text('{"license": "cc0"}')
    (src / "bad.png").write_bytes(b"not an image at all")

    manifest = write_folder_corpus(src, tmp_path / "folder", samples_per_shard=10)
    assert manifest.num_samples == 3
    assert manifest.write_report["skipped"] == {"missing_caption": 1, "undecodable": 1}
    samples = list(CorpusReader(tmp_path / "folder", TINY, "pillow"))
    by_src = {s["meta"]["source"]: s for s in samples}
    assert set(by_src) == {"a.png", "c.jpg", "sub/b.png"}
    assert by_src["a.png"]["meta"]["license"] == "cc0"
    assert by_src["sub/b.png"]["caption"] == "caption of sub/b"
    assert torch.equal(by_src["a.png"]["pixels"], preprocess(imgs["a.png"], TINY))
    assert torch.equal(by_src["c.jpg"]["pixels"], preprocess(Image.open(src / "c.jpg"), TINY))

    lines = [
        json.dumps({"image": "a.png", "caption": "first", "score": 0.5}),
        json.dumps({"image": str(src / "sub" / "b.png"), "caption": "second"}),  # absolute path
        "{not json",
        json.dumps({"image": "missing.png", "caption": "x"}),
        json.dumps({"image": "c.jpg", "caption": "   "}),
        "",
    ]
    (src / "list.jsonl").write_text("\n".join(lines) + "\n")
    manifest = write_jsonl_corpus(src / "list.jsonl", tmp_path / "jsonl", samples_per_shard=10)
    assert manifest.num_samples == 2
    assert manifest.write_report["skipped"] == {"bad_metadata": 1, "missing_image": 1, "missing_caption": 1}
    samples = list(CorpusReader(tmp_path / "jsonl", TINY, "pillow"))
    assert [s["caption"] for s in samples] == ["first", "second"]
    assert samples[0]["meta"] == {"score": 0.5, "source": "a.png"}
    assert torch.equal(samples[1]["pixels"], preprocess(imgs["sub/b.png"], TINY))


def test_writer_refuses_to_clobber_and_leaves_no_partial_state(tmp_path):
    write_world_corpus(tmp_path / "c", 3, samples_per_shard=2)
    with pytest.raises(ValueError, match="overwrite=True"):
        write_world_corpus(tmp_path / "c", 3)
    write_world_corpus(tmp_path / "c", 1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["index.json", "shard-000000.tar"]

    # a writer interrupted by an exception writes no manifest and no shard that looks finished
    def boom():
        yield Image.new("RGB", (64, 64)), "ok", {}
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_corpus(boom(), tmp_path / "d")
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert "index.json" not in names and not any(n.endswith(".tar") for n in names)


def test_writer_counts_bad_inputs(tmp_path):
    recs = [
        (Image.new("RGB", (64, 64)), "good", {}),
        (Image.new("RGB", (64, 64)), "", {}),
        (b"", "empty", {}),
        (Image.new("RGB", (64, 64)), "bad meta", {"x": object()}),
    ]
    manifest = write_corpus(recs, tmp_path / "c")
    assert manifest.num_samples == 1
    assert manifest.write_report["skipped"] == {
        SkipReason.MISSING_CAPTION.value: 1,
        SkipReason.EMPTY_FILE.value: 1,
        SkipReason.BAD_METADATA.value: 1,
    }


@pytest.mark.skipif(dali_available(), reason="checks the CPU fallback of decoder='auto'")
def test_auto_decoder_falls_back_to_pillow_without_cuda():
    assert make_decoder("auto", TINY).name == "pillow"
    with pytest.raises(ValueError, match="nvidia.dali"):
        make_decoder("dali", TINY)
