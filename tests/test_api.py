"""The documented public API (megatron_xomni.api, README "Python API"):

- load_xomni at TP2, TP2 x PP2 and (plain process) TP1 + logits(token_ids, mode) against a reference
  written here: the checkpoint loaded by hand at TP1 (dist-ckpt straight into build_model_chunks),
  one plain forward, and X-Omni's mode masking spelled out (not the model's mode_logits);
- XOmniPipeline.from_bundle(...).generate(...) at TP2 against greedy codes from that plain forward
  (argmax over the image vocabulary, step by step) decoded by hand with the decoder and the same seed.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.inference.fixtures import bundle  # noqa: F401  (session fixture)
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(300)

# Text prefix, then an image block: image ids (>= text vocab 512) exercise the vision layers.
IDS = [[5, 17, 300, 2, 9, 512 + 3, 512 + 200, 512 + 31], [44, 1, 7, 120, 8, 512 + 255, 512 + 0, 512 + 17]]
PROMPT, SEED, SIZE = "two blue squares", 7, (32, 48)


def _reference(rank, world, bundle):
    """TP1 by hand: build, load the dist-ckpt, one forward; greedy codes + hand decode for the prompt."""
    import torch

    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.inference.pipeline import init_process_group
    from megatron_xomni.models.flux_decoder import XOmniDecoder
    from megatron_xomni.models.flux_decoder.sampling import sample_from_codes
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig

    pg = init_process_group()
    path = resolve_checkpoint(bundle / "model")
    cfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
    (model,) = build_model_chunks(cfg, ParallelConfig(), pg)
    loaded = load_checkpoint(path, {"model": model.sharded_state_dict()}, partial=True)
    model.load_state_dict(loaded["model"], strict=False)
    model.eval()
    ids = torch.tensor(IDS)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        text, image = model(ids, pos, None, runtime_gather_output=True)
    v, table, k = cfg.text_vocab_size, cfg.image_table_size, cfg.image_vocab_size
    low = torch.finfo(torch.float32).min
    want_text = torch.cat([text, torch.full((*ids.shape, table), low)], -1)
    want_image = torch.cat([torch.full((*ids.shape, v), low), image[..., :k], torch.full((*ids.shape, table - k), low)], -1)

    tok = XOmniTextTokenizer.load(bundle / "text_tokenizer")
    h, w = SIZE[0] // 16, SIZE[1] // 16  # the tiny tokenizer's patch is 16 px (checked below)
    seq = tok.encode(PROMPT) + [tok.som_id] + tok.encode(f"{h} {w}") + [tok.image_id]
    codes = []
    for _ in range(h * w):
        with torch.no_grad():
            _, img = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None, runtime_gather_output=True)
        codes.append(int(img[0, -1, :k].argmax()))
        seq.append(v + codes[-1])
    itok = SiglipVQTokenizer.from_pretrained(bundle / "image_tokenizer").eval()
    assert itok.cfg.patch_size == 16
    dec = XOmniDecoder.from_pretrained(bundle / "decoder").eval()
    pixels = sample_from_codes(dec, itok, torch.tensor(codes).view(1, h, w), prompts=[PROMPT],
                               generator=[SEED])[0]
    arr = (((pixels.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return want_text.numpy(), want_image.numpy(), np.array(codes).reshape(h, w), arr


def _api(rank, world, bundle, tp, pp, with_generate):
    from megatron_xomni import api

    chunks, cfg = api.load_xomni(bundle / "model", api.ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    out = {"text": api.logits(chunks, IDS, "text").numpy(), "image": api.logits(chunks, IDS, mode="image").numpy(),
           "vocab": (cfg.text_vocab_size, cfg.image_table_size)}
    if with_generate:
        pipe = api.XOmniPipeline.from_bundle(str(bundle))  # at the layout load_xomni started
        greedy = api.SamplingConfig(temperature=0.0)
        out["codes"] = pipe.generate_codes([PROMPT], *SIZE, seeds=[SEED], sampling=greedy)[0].numpy()
        images = pipe.generate([PROMPT], *SIZE, seeds=[SEED], sampling=greedy)
        out["image_px"] = None if images is None else np.asarray(images[0])
    return out


def test_load_at_tp2_and_pp2_logits_and_generate_match_a_single_rank_reference(bundle):
    (want_text, want_image, want_codes, want_px), = run_ranks(_reference, 1, bundle)
    tp2 = run_ranks(_api, 2, bundle, 2, 1, True)
    tp2pp2 = run_ranks(_api, 4, bundle, 2, 2, False)
    tp1, = run_ranks(_api, 1, bundle, 1, 1, False)  # a plain process: load_xomni starts the one-rank world

    for out in [tp1, *tp2, *tp2pp2]:  # every rank returns the full logits
        assert out["text"].shape == (2, 8, sum(out["vocab"]))
        np.testing.assert_allclose(out["text"], want_text, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["image"], want_image, rtol=1e-5, atol=1e-5)
    # the masking is real: text mode never ranks an image id first, image mode never a text id
    assert (want_text.argmax(-1) < 512).all() and (want_image.argmax(-1) >= 512).all()

    for out in tp2:
        np.testing.assert_array_equal(out["codes"], want_codes)
    assert len(set(want_codes.reshape(-1).tolist())) > 1  # a non-degenerate grid
    np.testing.assert_array_equal(tp2[0]["image_px"], want_px)  # rank 0 holds the decoder
    assert tp2[1]["image_px"] is None


def _bad_calls(rank, world, bundle):
    from megatron_xomni import api

    chunks, _ = api.load_xomni(bundle / "model")
    errors = []
    for ids, mode in [(IDS, "audio"), ([[1, 2], [3]], "text"), ([[1, 99999]], "text")]:
        try:
            api.logits(chunks, ids, mode)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_logits_refuses_bad_ids_and_modes(bundle):
    errors, = run_ranks(_bad_calls, 1, bundle)
    assert len(errors) == 3
    assert "mode must be 'text' or 'image'" in errors[0]
    assert "different lengths" in errors[1] and "[0, 832)" in errors[2]
    assert all("\n" not in e for e in errors)
