"""The fault table of the inference-side loaders, through the `xomni` command.

Each case damages one file of a copy of the tiny bundle (or passes a bad prompt file / image) and
expects: exit code 2, exactly one `error:` line that names the damaged file and says what is wrong
with it (a folder is "a folder", not "does not exist"; a missing model_config.json is missing, not
"another model config"), nothing built, loaded or started, and no --out folder left behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.data.test_pixel_cap import header_only_png
from tests.inference.fixtures import no_loading  # noqa: F401  (fixture)

CKPT = "model/iter_0000000"
PART = f"{CKPT}/__0_0.distcp"
ITOK_W = "image_tokenizer/model.safetensors"
DEC_W = "decoder/transformer/diffusion_pytorch_model.safetensors"
VAE_W = "decoder/vae/diffusion_pytorch_model.safetensors"


def truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def zero(p: Path):
    p.write_bytes(b"")


def missing(p: Path):
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def garbage(p: Path):  # same length, so only a content check can tell
    p.write_bytes(os.urandom(p.stat().st_size))


def folder(p: Path):
    missing(p)
    p.mkdir()


def file_for_folder(p: Path):
    missing(p)
    p.write_text("x")


def not_json(p: Path):
    p.write_text('{"hidden_size": 64,')


def binary(p: Path):
    p.write_bytes(b"\x89\x00\xff\xfe binary \x00 bytes")


def drop_key(key):
    def f(p: Path):
        data = json.loads(p.read_text())
        del data[key]
        p.write_text(json.dumps(data))
    f.__name__ = f"drop_{key}"
    return f


# (file relative to the bundle, fault, words the message must contain)
BUNDLE_CASES = [
    (PART, truncate, "is truncated"),
    (PART, zero, "is empty (0 bytes)"),
    (PART, missing, "does not exist"),
    (PART, garbage, "holds no tensor data"),
    (PART, folder, "is a folder, not a file"),
    (f"{CKPT}/.metadata", truncate, "is not a checkpoint index"),
    (f"{CKPT}/.metadata", garbage, "is not a checkpoint index"),
    (f"{CKPT}/.metadata", missing, "does not exist"),
    (f"{CKPT}/common.pt", garbage, "is not torch.save data"),
    (f"{CKPT}/metadata.json", not_json, "is not valid JSON"),
    (f"{CKPT}/model_config.json", missing, "model config " + "{file} does not exist; restore it"),
    (f"{CKPT}/model_config.json", not_json, "is not valid JSON"),
    (f"{CKPT}/model_config.json", binary, "is binary, not JSON text"),
    (f"{CKPT}/model_config.json", drop_key("hidden_size"), "lacks the key(s) 'hidden_size'"),
    (f"{CKPT}/model_config.json", folder, "is a folder, not a file"),
    (ITOK_W, truncate, "not a readable safetensors file"),
    (ITOK_W, zero, "is empty (0 bytes)"),
    (ITOK_W, missing, "does not exist"),
    (ITOK_W, garbage, "not a readable safetensors file"),
    ("image_tokenizer/config.json", missing, "does not exist"),
    ("image_tokenizer/config.json", not_json, "is not valid JSON"),
    ("image_tokenizer/config.json", drop_key("codebook_size"), "lacks the key(s) 'codebook_size'"),
    (DEC_W, truncate, "not a readable safetensors file"),
    (DEC_W, garbage, "not a readable safetensors file"),
    (DEC_W, zero, "is empty (0 bytes)"),
    (VAE_W, missing, "does not exist"),
    ("decoder/transformer/config.json", not_json, "is not valid JSON"),
    ("decoder/decoder_config.json", missing, "does not exist"),
    ("decoder/decoder_config.json", not_json, "is not valid JSON"),
    ("decoder/decoder_config.json", drop_key("variant"), "lacks the key(s) 'variant'"),
    ("text_tokenizer/text_tokenizer.json", not_json, "is not valid JSON"),
    ("text_tokenizer/spm.model", garbage, "cannot be parsed"),
    ("text_tokenizer/spm.model", zero, "is empty (0 bytes)"),
    ("text_tokenizer", missing, "does not exist"),
    ("model", file_for_folder, "is a file, not a folder"),
]


def _run(argv, capsys) -> str:
    from megatron_xomni import cli

    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _damaged(bundle: Path, tmp_path: Path, rel: str, fault) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    fault(copy / rel)
    return copy


def _generate(bundle, out):
    return ["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--size", "64x64", "--out", str(out)]


@pytest.mark.parametrize("rel,fault,words", BUNDLE_CASES,
                         ids=[f"{rel}:{fault.__name__}" for rel, fault, _ in BUNDLE_CASES])
def test_damaged_bundle_file(bundle, tmp_path, capsys, no_loading, rel, fault, words):
    copy = _damaged(bundle, tmp_path, rel, fault)
    out = tmp_path / "out"
    err = _run(_generate(copy, out), capsys)
    assert words.format(file=copy / rel) in err
    assert str(copy / rel) in err  # the message names the file
    assert "another model config" not in err and "not written by megatron_xomni" not in err
    assert not out.exists() and no_loading == []


def test_bundle_paths(bundle, tmp_path, capsys, no_loading):
    assert "bundle " + str(tmp_path / "nope") + " does not exist" in _run(_generate(tmp_path / "nope", tmp_path / "o"), capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in _run(_generate(tmp_path / "file", tmp_path / "o"), capsys)
    copy = _damaged(bundle, tmp_path, "model/latest_checkpointed_iteration.txt", lambda p: p.write_text("7"))
    assert "iter_0000007 does not exist" in _run(_generate(copy, tmp_path / "o"), capsys)
    assert no_loading == []


PROMPT_FAULTS = {
    "binary": (lambda p: p.write_bytes(b"\x00\x01\x02\xff\xfe\x00"), "is binary, not UTF-8 text"),
    "folder": (lambda p: p.mkdir(), "is a folder, not a file"),
    "empty": (lambda p: p.write_text(""), None),
    "missing": (lambda p: None, "does not exist"),
}


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("fault", list(PROMPT_FAULTS))
def test_bad_prompts_file(bundle, tmp_path, capsys, no_loading, suffix, fault):
    path = tmp_path / f"prompts{suffix}"
    make, words = PROMPT_FAULTS[fault]
    make(path)
    err = _run(["generate", "--bundle", str(bundle), "--prompts-file", str(path), "--out", str(tmp_path / "o")], capsys)
    assert str(path) in err
    assert (words or "is empty") in err
    assert not (tmp_path / "o").exists() and no_loading == []


@pytest.mark.parametrize("bench,name", [("geneval", "evaluation_metadata.jsonl"), ("longtext", "text_prompts.jsonl"),
                                            ("dpg", "dpg_bench.csv")])
@pytest.mark.parametrize("fault", ["binary", "folder", "empty"])
def test_bad_benchmark_prompts(bundle, tmp_path, capsys, no_loading, bench, name, fault):
    path = tmp_path / name
    make, words = PROMPT_FAULTS[fault]
    make(path)
    err = _run(["evaluate", "--benchmark", bench, "--prompts", str(path), "--bundle", str(bundle),
                "--size", "64x64", "--out", str(tmp_path / "o")], capsys)
    if fault == "folder" and bench != "dpg":  # a folder is searched for the benchmark's file
        assert "not found" in err or "has neither" in err
    elif fault == "folder":  # DPG: a folder without prompts/ or the CSV
        assert "has neither prompts/ nor dpg_bench.csv" in err
    else:
        assert str(path) in err and (words or "empty") in err
    assert not (tmp_path / "o").exists() and no_loading == []


IMAGE_FAULTS = {
    "binary": (lambda p: p.write_bytes(b"\x00 not an image at all \xff" * 10), "unknown image format"),
    "folder": (lambda p: p.mkdir(), "is a folder, not a file"),
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "missing": (lambda p: None, "does not exist"),
    "huge_header": (lambda p: p.write_bytes(header_only_png(20000, 20000)), "above the cap of 64,000,000"),
    "too_small": (lambda p: p.write_bytes(_png(16, 16)), "rejected (too_small)"),
    "truncated": (lambda p: p.write_bytes(_png(64, 64)[:300]), "cannot be decoded"),
}


def _png(h, w):
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fault", list(IMAGE_FAULTS))
def test_bad_chat_image(bundle, tmp_path, capsys, no_loading, fault):
    path = tmp_path / "img.png"
    make, words = IMAGE_FAULTS[fault]
    make(path)
    err = _run(["chat", "--bundle", str(bundle), "--image", str(path), "--question", "what is it?"], capsys)
    assert str(path) in err and words in err
    assert no_loading == []


def test_library_loaders_give_the_same_one_line_errors(bundle, tmp_path):
    """The models' own from_pretrained check their files too (for users of the Python API)."""
    from megatron_xomni.file_checks import BadFile
    from megatron_xomni.models.flux_decoder import XOmniDecoder
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer

    copy = _damaged(bundle, tmp_path, ITOK_W, truncate)
    with pytest.raises(BadFile, match="not a readable safetensors file") as info:
        SiglipVQTokenizer.from_pretrained(copy / "image_tokenizer")
    assert "\n" not in str(info.value)
    garbage(copy / DEC_W)
    with pytest.raises(BadFile, match=f"decoder transformer weights {copy / DEC_W} is not a readable"):
        XOmniDecoder.from_pretrained(copy / "decoder")
    with pytest.raises(BadFile, match="is a file, not a folder"):
        XOmniDecoder.from_pretrained(copy / "question.png")

    # weights that parse but do not fit the config: still one line, naming both files
    shutil.copy(bundle / ITOK_W, copy / ITOK_W)
    cfg = json.loads((copy / "image_tokenizer/config.json").read_text())
    (copy / "image_tokenizer/config.json").write_text(json.dumps({**cfg, "width": 32}))
    with pytest.raises(BadFile, match="do not fit its config.json") as info:
        SiglipVQTokenizer.from_pretrained(copy / "image_tokenizer")
    assert "\n" not in str(info.value)
