"""XOmniPipeline against references written here: greedy image codes and greedy chat answers from a plain
full-recompute forward (argmax over the mode's vocabulary), and decoded images from the decoder called
by hand with the same features, prompt and seed. One rank launch holds every check."""
from __future__ import annotations

import numpy as np
import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(240)

PROMPTS = ["a red circle", "two blue squares next to a green triangle"]  # different lengths: separate buckets
QUESTIONS = ["What color is the shape?", "How many shapes are there?"]


def _forward_logits(model, ids):
    import torch

    t = torch.tensor([ids])
    pos = torch.arange(len(ids)).unsqueeze(0)
    with torch.no_grad():
        text, image = model(t, pos, None, runtime_gather_output=True)
    return text[0, -1], image[0, -1]


def _reference_codes(model, tok, prompt, grid, text_v, image_v):
    """Greedy X-Omni image decoding written out: prompt <SOM>h w<IMAGE>, h*w argmax steps over the codes."""
    h, w = grid
    ids = tok.encode(prompt) + [tok.som_id] + tok.encode(f"{h} {w}") + [tok.image_id]
    codes = []
    for _ in range(h * w):
        _, image = _forward_logits(model, ids)
        k = int(image[:image_v].argmax())
        codes.append(k)
        ids.append(text_v + k)
    return np.array(codes).reshape(h, w)


def _reference_chat(model, tok, pixels_codes, questions, text_v, max_new, given=None):
    """Greedy understanding: <SOM>h w<IMAGE> codes <EOM> q1 ' ' a1 '\\n' q2 ' ' ..., text head argmax to EOS.

    given: {turn: answer text} answers taken as context instead of generated."""
    h, w = pixels_codes.shape
    ids = [tok.som_id] + tok.encode(f"{h} {w}") + [tok.image_id] + [text_v + int(c) for c in pixels_codes.reshape(-1)]
    ids.append(tok.eom_id)
    answers = []
    for n, q in enumerate(questions):
        ids += tok.encode(("\n" if n else "") + q + " ")
        if given and n in given:
            ids += tok.encode(given[n])
            answers.append(given[n])
            continue
        new = []
        for _ in range(max_new):
            text, _ = _forward_logits(model, ids + new)
            nxt = int(text.argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
        ids += new
        answers.append(tok.decode([i for i in new if i < tok.vocab_size]))
    return answers


def _rank(rank, world, bundle):
    import torch
    from PIL import Image

    from megatron_xomni.models.flux_decoder.sampling import sample
    from megatron_xomni.inference import XOmniPipeline
    from megatron_xomni.inference.sampling import SamplingConfig

    pipe = XOmniPipeline.from_bundle(bundle)
    model, tok, cfg = pipe.chunks[0], pipe.text_tokenizer, pipe.model_config
    out = {}

    # 1. greedy codes: prompt format + image-mode masking, against the plain forward
    greedy = SamplingConfig(temperature=0.0)
    got = pipe.generate_codes(PROMPTS, 64, 48, seeds=[3, 4], sampling=greedy)
    ref = [_reference_codes(model, tok, p, (4, 3), cfg.text_vocab_size, cfg.image_vocab_size) for p in PROMPTS]
    out["greedy_equal"] = [np.array_equal(g.numpy(), r) for g, r in zip(got, ref)]
    out["greedy_shape"] = [tuple(g.shape) for g in got]

    # 2. sampled codes: an image depends on its seed, not on its place in the request
    a = pipe.generate_codes(PROMPTS, 64, 64, seeds=[7, 8])
    b = pipe.generate_codes(PROMPTS[::-1], 64, 64, seeds=[8, 7])
    c = pipe.generate_codes(PROMPTS, 64, 64, seeds=[7, 9])
    out["sampled_reorder_equal"] = [a[0].tolist() == b[1].tolist(), a[1].tolist() == b[0].tolist()]
    out["other_seed_differs"] = a[1].tolist() != c[1].tolist()
    out["codes_in_range"] = all(0 <= int(x.min()) and int(x.max()) < cfg.image_vocab_size for x in a)

    # 3. generate = codes -> tokenizer features -> decoder (prompt + seed) -> uint8 image
    images = pipe.generate(PROMPTS, 64, 64, seeds=[7, 8], decoder_steps=2)
    with torch.no_grad():  # decoded as one batch, like the pipeline (batch size changes float rounding)
        feats = pipe.image_tokenizer.decode_features(torch.stack(a))
        px = sample(pipe.decoder, feats, (4, 4), prompts=PROMPTS, num_inference_steps=2, generator=[7, 8])
    refs = [np.round(np.clip((x.numpy().transpose(1, 2, 0) + 1) / 2, 0, 1) * 255).astype(np.uint8) for x in px]
    out["image_equal"] = [np.array_equal(np.asarray(im), r) for im, r in zip(images, refs)]
    out["image_size"] = [im.size for im in images]
    out["images_differ"] = not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))

    # 4. chat (greedy), multi-turn, against the plain forward on codes of the hand-normalised image
    img = Image.open(f"{bundle}/question.png").convert("RGB")
    pixels = torch.from_numpy((np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    codes = pipe.image_tokenizer.encode(pixels)[0].numpy()
    out["chat"] = pipe.chat_turns([f"{bundle}/question.png"], QUESTIONS, max_new_tokens=6)
    out["chat_ref"] = _reference_chat(model, tok, codes, QUESTIONS, cfg.text_vocab_size, 6)
    out["chat_last"] = pipe.chat([img], QUESTIONS, max_new_tokens=6)
    # a given (question, answer) history turn is context, not regenerated
    given = "a red circle"
    out["chat_history"] = pipe.chat_turns([img], [(QUESTIONS[0], given), QUESTIONS[1]], max_new_tokens=6)
    out["chat_history_ref"] = _reference_chat(model, tok, codes, QUESTIONS, cfg.text_vocab_size, 6, {0: given})

    # 5. an image path whose header declares 20000x20000 is refused before decoding, naming the file
    import tempfile

    from tests.data.test_pixel_cap import header_only_png

    with tempfile.TemporaryDirectory() as d:
        huge = f"{d}/huge.png"
        open(huge, "wb").write(header_only_png(20000, 20000))
        try:
            pipe.chat_turns([huge], QUESTIONS[:1], max_new_tokens=2)
            out["huge"] = None
        except ValueError as e:
            out["huge"] = (huge, str(e))
    return out


def test_pipeline_matches_references(bundle):
    (r,) = run_ranks(_rank, 1, str(bundle))
    assert r["greedy_shape"] == [(4, 3), (4, 3)]
    assert r["greedy_equal"] == [True, True]
    assert r["sampled_reorder_equal"] == [True, True]
    assert r["other_seed_differs"]
    assert r["codes_in_range"]
    assert r["image_size"] == [(64, 64), (64, 64)]
    assert r["image_equal"] == [True, True]
    assert r["images_differ"]
    assert r["chat"] == r["chat_ref"]
    assert r["chat_last"] == r["chat_ref"][-1]
    assert r["chat_history"] == r["chat_history_ref"]
    assert r["chat_history"][0] == "a red circle"
    path, msg = r["huge"]
    assert msg.startswith(f"image {path}: image 20000x20000 has 400,000,000 pixels, above the cap")


def test_spec_rejects_bad_sizes_and_prompts(bundle):
    from megatron_xomni.inference import PipelinePaths, inspect_paths

    spec = inspect_paths(PipelinePaths.from_bundle(bundle))
    assert spec.grid(64, 32) == (4, 2)
    with pytest.raises(ValueError, match="not a multiple of the 16-pixel token grid: use e.g. 64x64"):
        spec.grid(60, 64)
    with pytest.raises(ValueError, match="reserved token '<SOM>'"):
        spec.check_generation(["a <SOM> b"], 64, 64)
    # 1024 positions in the tiny model: a 32x32 grid alone needs 1024 + header + <EOM>
    with pytest.raises(ValueError, match="max_position_embeddings=1024"):
        spec.check_generation(["a"], 512, 512)
    assert spec.preprocess_config("auto").max_long == 192  # tiny tokenizer -> tiny rules
