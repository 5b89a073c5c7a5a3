"""`xomni corpus`: a corpus from a folder of captioned images or from a JSONL, skips counted, one-line
errors, no overwrite without --overwrite."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_xomni.cli import main
from megatron_xomni.data.corpus import CorpusManifest
from megatron_xomni.data.reader import iter_tar_records


def _png(seed, hw=(40, 56), fmt="PNG"):
    arr = np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _records(corpus):
    """{caption: (image bytes, meta)} read straight from the tar shards the manifest lists."""
    out = {}
    for shard in CorpusManifest.load(corpus).shards:
        for _, _, parts, error in iter_tar_records(corpus / shard.name):
            assert error is None
            image = next(v for k, v in parts.items() if k in ("png", "jpg"))
            out[parts["txt"].decode()] = (image, json.loads(parts["json"]))
    return out


def _run(capsys, *args):
    rc = main(["corpus", "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    files = {}
    for i in range(4):
        files[f"img{i}.png"] = _png(i, (40 + 8 * i, 56))
        (d / f"img{i}.png").write_bytes(files[f"img{i}.png"])
        (d / f"img{i}.txt").write_text(f"  photo number {i}\n")
    files["sub/deep.jpg"] = _png(9, (64, 48), "JPEG")
    (d / "sub" / "deep.jpg").write_bytes(files["sub/deep.jpg"])
    (d / "sub" / "deep.txt").write_text("a deep photo")
    (d / "sub" / "deep.json").write_text('{"license": "cc-by"}')
    (d / "nocap.png").write_bytes(_png(5))  # no caption file
    (d / "broken.png").write_bytes(_png(6)[:60])  # truncated PNG, with a caption
    (d / "broken.txt").write_text("broken")
    (d / "notes.md").write_text("not an image")
    return d, files


def test_folder_corpus_stores_every_captioned_image_and_counts_the_rest(folder, tmp_path, capsys):
    d, files = folder
    rc, out, err = _run(capsys, "--images", str(d), "--out", str(tmp_path / "c"), "--samples-per-shard", "2")
    assert rc == 0, err
    recs = _records(tmp_path / "c")
    assert set(recs) == {f"photo number {i}" for i in range(4)} | {"a deep photo"}
    for i in range(4):  # the original bytes, the caption stripped, the source path in meta
        assert recs[f"photo number {i}"] == (files[f"img{i}.png"], {"source": f"img{i}.png"})
    assert recs["a deep photo"] == (files["sub/deep.jpg"], {"license": "cc-by", "source": "sub/deep.jpg"})
    manifest = CorpusManifest.load(tmp_path / "c")
    assert [s.count for s in manifest.shards] == [2, 2, 1]
    assert manifest.write_report["skipped"] == {"missing_caption": 1, "truncated": 1}
    assert out.splitlines()[0] == f"corpus {tmp_path / 'c'}: 5 records in 3 shard(s)"
    assert "missing_caption" in out and "truncated" in out

    # a second run into the same folder is refused in one line; --overwrite replaces the corpus
    rc, out, err = _run(capsys, "--images", str(d), "--out", str(tmp_path / "c"))
    assert rc == 2 and err == f"error: --out {tmp_path / 'c'} is not empty: pass --overwrite to replace the corpus in it, or pick a new folder\n"
    rc, out, err = _run(capsys, "--images", str(d), "--out", str(tmp_path / "c"), "--overwrite", "--no-recursive")
    assert rc == 0, err
    assert [s.count for s in CorpusManifest.load(tmp_path / "c").shards] == [4]  # one shard, no subfolder
    assert not (tmp_path / "c" / "shard-000002.tar").exists()


def test_jsonl_corpus(folder, tmp_path, capsys):
    d, files = folder
    lines = [{"image": "img0.png", "caption": "first", "tags": ["a"]},
             {"image": str(d / "sub" / "deep.jpg"), "caption": "absolute path"},
             {"image": "missing.png", "caption": "no such file"},
             {"image": "img1.png", "caption": ""},
             "not json {",
             {"caption": "no image"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    rc, out, err = _run(capsys, "--jsonl", str(path), "--image-root", str(d), "--out", str(tmp_path / "j"))
    assert rc == 0, err
    recs = _records(tmp_path / "j")
    assert recs == {"first": (files["img0.png"], {"tags": ["a"], "source": "img0.png"}),
                    "absolute path": (files["sub/deep.jpg"], {"source": str(d / "sub" / "deep.jpg")})}
    report = CorpusManifest.load(tmp_path / "j").write_report
    assert report["skipped"] == {"missing_image": 2, "missing_caption": 1, "bad_metadata": 1}
    assert out.splitlines()[0].endswith(": 2 records in 1 shard(s)")


@pytest.mark.parametrize("case, message", [
    ("empty_folder", "holds no image files"),
    ("no_caption_anywhere", "no record could be written from"),
    ("binary_jsonl", "is not UTF-8 text"),
    ("missing_jsonl", "does not exist"),
    ("out_is_file", "is a file, not a folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    if case == "empty_folder":
        args = ["--images", str(tmp_path / "in")]
    elif case == "no_caption_anywhere":
        (tmp_path / "in" / "a.png").write_bytes(_png(0))
        args = ["--images", str(tmp_path / "in")]
    elif case == "binary_jsonl":
        (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00binary")
        args = ["--jsonl", str(tmp_path / "b.jsonl")]
    elif case == "missing_jsonl":
        args = ["--jsonl", str(tmp_path / "nope.jsonl")]
    else:
        out.write_text("x")
        (tmp_path / "in" / "a.png").write_bytes(_png(0))
        args = ["--images", str(tmp_path / "in")]
    rc, _, err = _run(capsys, *args, "--out", str(out))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if case == "no_caption_anywhere":
        assert not (out / "index.json").exists()  # nothing that looks like a finished corpus


def test_images_and_jsonl_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["corpus", "--images", str(tmp_path), "--jsonl", "x.jsonl", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
