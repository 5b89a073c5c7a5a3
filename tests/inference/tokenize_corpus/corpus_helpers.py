"""A small planted corpus and the documents the spec says it must become (shared by the pipeline tests).

Expected documents are composed here from the spec (the X-Omni layout written out by hand), the corpus
images (preprocessed one by one with the data package), the text tokenizer and the frozen image tokenizer;
nothing from megatron_xomni.data.sequence is used.
"""
import io
from pathlib import Path

import torch
from PIL import Image

from megatron_xomni.data import CorpusWriter, ImagePreprocessConfig, preprocess
from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig, load_image_tokenizer
from megatron_xomni.world import sample_world

TV = 512
FILES = [f"_{m}{s}" for m in ("generation", "understanding") for s in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx")]
NUM_GOOD = 10


def records():
    """(image, caption, meta) in write order: 10 good records, one undecodable, one too small."""
    recs = []
    for i in range(9):
        size = (64, 96) if i in (4, 5) else (64, 64)  # a size change inside a shard splits the encode batch
        s = sample_world(i, seed=3, height=size[0], width=size[1])
        recs.append((s.image, s.caption, {"qa": [list(p) for p in s.qa]}))
    recs.insert(2, (b"definitely not an image", "garbage bytes", {}))
    recs.insert(6, (Image.new("RGB", (16, 16), "red"), "too small to keep", {}))
    recs.append((sample_world(20, seed=3).image, "a caption without questions", {}))
    return recs


def write_corpus(directory) -> Path:
    with CorpusWriter(directory, samples_per_shard=3, validate=False) as w:  # 12 records -> 4 shards
        for image, caption, meta in records():
            w.add(image, caption, meta, image_ext="png")
    return Path(directory)


def expected_documents(text_tok):
    """{mode: [(ids, mask)]} from the spec, one record at a time."""
    t = text_tok
    image_tok = load_image_tokenizer("tiny", init_seed=0)
    gen, und = [], []
    for image, caption, meta in records():
        if isinstance(image, bytes) or min(image.size) < 32:
            continue  # undecodable / too small (the tiny rules reject a short side < 32)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pixels = preprocess(Image.open(buf), ImagePreprocessConfig.tiny())
        with torch.no_grad():
            codes = image_tok.encode(pixels[None])[0]
        h, w = codes.shape
        header = [t.som_id] + t.encode(str(h)) + t.encode(" ") + t.encode(str(w)) + [t.image_id]
        img = [TV + int(c) for c in codes.reshape(-1)]
        cap = t.encode(caption)
        gen.append((cap + header + img + [t.eom_id, t.eos_id],
                    [0] * (len(cap) + len(header)) + [1] * (len(img) + 1) + [0]))
        ids, mask = header + img + [t.eom_id], [0] * (len(header) + len(img) + 1)
        qa = meta.get("qa") or [["Describe the image.", caption]]
        for n, (q, a) in enumerate(qa):
            p, ans = t.encode(("\n" if n else "") + q + " "), t.encode(a)
            ids, mask = ids + p + ans, mask + [0] * len(p) + [1] * len(ans)
        und.append((ids + [t.eos_id], mask + [1]))
    return {"generation": gen, "understanding": und}


def make_cfg(corpus, text_tok_dir, out, **kw) -> TokenizeRunConfig:
    """Outputs at <out>_<mode>.* and <out>.json (save_dir = out's folder, prefix = its name)."""
    out = Path(out)
    return TokenizeRunConfig(corpus=str(corpus), save_dir=str(out.parent), prefix=out.name,
                             text_tokenizer=str(text_tok_dir), image_tokenizer="tiny", seed=0, text_vocab_size=TV,
                             progress=False, batch_size=4, **kw)


def read_outputs(prefix) -> dict[str, bytes]:
    return {name: Path(f"{prefix}{name}").read_bytes() for name in FILES}
