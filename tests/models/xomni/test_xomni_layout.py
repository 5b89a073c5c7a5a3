"""The Megatron model computes what the released XOmniForCausalLM layout computes.

The reference (tests/models/xomni/released_reference.py) is written from transformers' own Qwen2
modules, following X-Omni's released inference code.
"""

import json

import pytest
import torch

from tests.models.xomni.released_reference import write_released
from tests.multirank import run_ranks

TEXT_V, IMG_V, IMG_T, ADAP, LM, HEAD, SEQ = 384, 128, 192, 1, 2, 1, 12


def _write_xomni(path):
    return write_released(path, vocab=TEXT_V, mm_vocab=IMG_T, image_vocab=IMG_V, adap=ADAP, lm=LM, head=HEAD)


def _ids():
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, TEXT_V, (2, SEQ), generator=g)
    image = TEXT_V + torch.randint(0, IMG_V, (2, SEQ), generator=g)
    return torch.where(torch.arange(SEQ) >= 5, image, text)


def _megatron_rank(rank, world, hf_dir, ckpt, export_dir, tp):
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_xomni.models.xomni import XOmniModelConfig, mode_logits
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.models.xomni.layers import XOmniVisionLayer
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    if tp == 1:
        convert_hf_to_megatron(hf_dir, ckpt)
        convert_megatron_to_hf(ckpt, export_dir, "xomni")
    par = ParallelConfig(tensor_parallel=tp)
    pg = initialize_parallel(par)
    path = resolve_checkpoint(ckpt)
    mcfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
    (model,) = build_model_chunks(mcfg, par, pg)
    load_model_state([model], load_checkpoint(path, model_sharded_state_dict([model])))
    model.eval()
    seen = []
    for m in model.modules():
        if isinstance(m, XOmniVisionLayer):
            m.register_forward_hook(
                lambda mod, args, kwargs, out: seen.append((kwargs["hidden_states"].clone(), out[0].clone())),
                with_kwargs=True)
    ids = _ids()
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        text, image = model(ids, pos, None, runtime_gather_output=True)
    return {
        "text": mode_logits(text, image, "text", mcfg.image_vocab_size),
        "image": mode_logits(text, image, "image", mcfg.image_vocab_size),
        "vision_io": seen,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xomni")
    ref = _write_xomni(root / "hf")
    ids = _ids()
    with torch.no_grad():
        expected = {m: ref(ids, m) for m in ("text", "image")}
    (tp1,) = run_ranks(_megatron_rank, 1, str(root / "hf"), str(root / "mg"), str(root / "export"), 1)
    tp2 = run_ranks(_megatron_rank, 2, str(root / "hf"), str(root / "mg"), str(root / "export"), 2)
    return root, expected, tp1, tp2


@pytest.mark.parametrize("mode", ["text", "image"])
def test_logits_match_released_layout(runs, mode):
    _, expected, tp1, tp2 = runs
    for got in [tp1] + tp2:
        assert (got[mode] - expected[mode]).abs().max().item() <= 1e-4


def test_image_mode_allows_exactly_the_codes(runs):
    _, _, tp1, _ = runs
    finite = tp1["image"][0, 0] > torch.finfo(torch.float32).min
    allowed = torch.nonzero(finite).flatten()
    assert torch.equal(allowed, torch.arange(TEXT_V, TEXT_V + IMG_V))
    text_allowed = torch.nonzero(tp1["text"][0, 0] > torch.finfo(torch.float32).min).flatten()
    assert torch.equal(text_allowed, torch.arange(TEXT_V))


def test_vision_blocks_leave_text_positions_bit_identical(runs):
    _, _, tp1, _ = runs
    is_image = (_ids() >= TEXT_V).T[..., None]  # [s, b, 1] activation layout
    assert len(tp1["vision_io"]) == ADAP + HEAD
    for before, after in tp1["vision_io"]:
        text_before = before.masked_select(~is_image)
        assert torch.equal(after.masked_select(~is_image), text_before)
        assert not torch.equal(after.masked_select(is_image), before.masked_select(is_image))


def test_xomni_round_trip_is_bit_exact(runs):
    from safetensors.torch import load_file

    root = runs[0]
    src = load_file(str(root / "hf" / "model.safetensors"))
    out = load_file(str(root / "export" / "model.safetensors"))
    assert set(src) == set(out)
    for k in src:
        assert torch.equal(src[k], out[k]), k
    cfg = json.loads((root / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["XOmniForCausalLM"] and cfg["num_hidden_layers"] == ADAP + LM + HEAD
