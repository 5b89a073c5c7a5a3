"""The Megatron model computes what the released XOmniForCausalLM layout computes.

The reference below is written in the test from transformers' own Qwen2 modules, following
X-Omni's released inference code: image positions are the ids >= text vocab; vision blocks
compute every position and keep the result at image positions only; the final norm is
mm_norm at image positions and lm_norm elsewhere; text mode = lm_head, image mode = the
first image_vocab_size outputs of mm_head.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.multirank import run_ranks

TEXT_V, IMG_V, IMG_T, ADAP, LM, HEAD, SEQ = 384, 128, 192, 1, 2, 1, 12


class RefXOmni(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import (Qwen2DecoderLayer, Qwen2RMSNorm,
                                                              Qwen2RotaryEmbedding)

        cfg = Qwen2Config(vocab_size=TEXT_V, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=ADAP + LM + HEAD, num_attention_heads=4,
                          num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                          max_position_embeddings=128)
        cfg._attn_implementation = "eager"
        self.cfg = cfg
        self.lm_embed_tokens = torch.nn.Embedding(TEXT_V, 64)
        self.mm_embed_tokens = torch.nn.Embedding(IMG_T, 64)
        self.layers = torch.nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.lm_norm, self.mm_norm = Qwen2RMSNorm(64, 1e-6), Qwen2RMSNorm(64, 1e-6)
        self.rotary = Qwen2RotaryEmbedding(cfg)
        self.lm_head = torch.nn.Linear(64, TEXT_V, bias=False)
        self.mm_head = torch.nn.Linear(64, IMG_T, bias=False)

    def forward(self, ids, mode):
        mask = (ids >= TEXT_V)[..., None]
        h = torch.where(mask, self.mm_embed_tokens((ids - TEXT_V).clamp(min=0)),
                        self.lm_embed_tokens(ids.clamp(max=TEXT_V - 1)))
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        cos_sin = self.rotary(h, pos)
        causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(self.layers):
            out = layer(h, attention_mask=causal, position_embeddings=cos_sin, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            is_lm = ADAP <= i < ADAP + LM
            h = out if is_lm else torch.where(mask, out, h)
        h = torch.where(mask, self.mm_norm(h), self.lm_norm(h))
        full = h.new_full((*h.shape[:-1], TEXT_V + IMG_T), torch.finfo(h.dtype).min)
        if mode == "text":
            full[..., :TEXT_V] = self.lm_head(h)
        else:
            full[..., TEXT_V:TEXT_V + IMG_V] = self.mm_head(h)[..., :IMG_V]
        return full


def _write_xomni(path):
    torch.manual_seed(0)
    ref = RefXOmni().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    state = {}
    for k, v in ref.state_dict().items():
        if "rotary" in k:
            continue
        name = k if k.endswith("_head.weight") and "." not in k[:-7] else f"model.{k}"
        state[name] = v.contiguous()
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    cfg = ref.cfg.to_dict()
    cfg.update(architectures=["XOmniForCausalLM"], model_type="x-omni", num_mm_adap_layers=ADAP,
               num_mm_head_layers=HEAD, mm_vocab_size=IMG_T, image_vocab_size=IMG_V,
               mm_special_tokens=["<SOM>", "<EOM>", "<IMAGE>"])
    (path / "config.json").write_text(json.dumps(cfg))
    return ref


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
