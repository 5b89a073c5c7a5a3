"""The decoder trains on a user's own images: a folder of PNGs with .txt captions (written here, no
world), made a corpus by `xomni corpus`, read through the corpus source; it learns (held-fixed
flow-matching loss drops), resumes exactly, and counts the bad files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.training.decoder_runs import decoder_cfg
from megatron_xomni.cli import main
from megatron_xomni.training.flux_decoder import flow_matching_loss, source_batches, train

SIZES = [(32, 32), (48, 32), (32, 48), (40, 40), (64, 48), (36, 52)]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: one thread is fastest under contention
    yield
    torch.set_num_threads(old)


def _photo(i: int) -> Image.Image:
    """A plain background with one coloured disc or box: structure a decoder can learn."""
    rng = np.random.default_rng(i)
    h, w = SIZES[i % len(SIZES)]
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(150, 255, 3)))
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    box = (x0, y0, x0 + w // 2, y0 + h // 2)
    colour = tuple(int(v) for v in rng.integers(0, 120, 3))
    (ImageDraw.Draw(img).ellipse if i % 2 else ImageDraw.Draw(img).rectangle)(box, fill=colour)
    return img


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    root = tmp_path_factory.mktemp("user_corpus")
    photos = root / "photos"
    photos.mkdir()
    for i in range(24):
        _photo(i).save(photos / f"p{i:02d}.png")
        (photos / f"p{i:02d}.txt").write_text(f"a {'disc' if i % 2 else 'box'} on a plain background")
    _photo(99).save(photos / "uncaptioned.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    (photos / "broken.txt").write_text("a broken file")
    assert main(["corpus", "--images", str(photos), "--out", str(root / "corpus"), "--samples-per-shard", "8",
                 "--no-progress"]) == 0
    torch.manual_seed(0)
    tok = SiglipVQTokenizer(tokenizer_config("tiny")).eval().requires_grad_(False)
    build_decoder(decoder_config("tiny", "image", adapter_dim=tok.cfg.adapter_dim), seed=0).save_pretrained(root / "init")
    return root, tok


def _cfg(root, name, **kw):
    base = dict(init_from=str(root / "init"), corpus=str(root / "corpus"), image_size=32, batch_size=4, lr=2e-3,
                warmup_steps=1, save_dir=str(root / name), sample_every=0, export=False, log_interval=1, save_interval=100, seed=3)
    base.update(kw)
    return decoder_cfg(**base)


def _held_loss(decoder, tok, cfg) -> float:
    """Flow-matching loss on 3 fixed corpus batches with fixed draws (steps 10_000+): the same before and after."""
    batches = source_batches(tok, cfg, start_step=0)
    with torch.no_grad():
        return float(np.mean([flow_matching_loss(decoder, next(batches), 10_000 + k, cfg, torch.float32).item()
                              for k in range(3)]))


def test_decoder_trains_on_a_folder_corpus_and_resumes_exactly(setup):
    from megatron_xomni.models.flux_decoder import XOmniDecoder

    root, tok = setup
    report = json.loads((root / "corpus" / "index.json").read_text())["write_report"]
    assert report["yielded"] == 24 and report["skipped"] == {"missing_caption": 1, "corrupt": 1}

    cfg = _cfg(root, "long", steps=40)
    before = _held_loss(XOmniDecoder.from_pretrained(root / "init"), tok, cfg)
    long = train(cfg, tok)
    after = _held_loss(long["decoder"], tok, cfg)
    assert after < 0.8 * before, (before, after)  # it learned the corpus' images
    assert long["data_report"].skipped == {}  # the corpus holds only good records: nothing to skip when reading
    assert (root / "long" / "data_skips" / "rank0.json").exists()

    straight = train(_cfg(root, "straight", steps=4), tok)
    first = train(_cfg(root, "split", steps=2, save_interval=2), tok)
    torch.manual_seed(999)  # a fresh process state: the checkpoint and the step-indexed batches are all that count
    second = train(_cfg(root, "split", steps=4, save_interval=2), tok)
    assert first["losses"] + second["losses"] == straight["losses"]
    a, b = straight["decoder"].transformer.state_dict(), second["decoder"].transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["losses"] == long["losses"][:4]  # the same batches whatever the run length
