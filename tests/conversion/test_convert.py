"""HF <-> Megatron conversion: bit-exact round trips through a TP=2 x PP=2 layout, real
initialisation of the new parts, and clear errors (with nothing partial written) on bad input."""

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conversion.hf_models import hf_tensors as _hf_tensors
from tests.conversion.hf_models import write_qwen
from tests.models.xomni.released_reference import write_released
from tests.multirank import run_ranks

V = 300  # not a multiple of 128: the import pads the text table to 384 rows, the export strips them


def _write_qwen(path, shards=2):
    return write_qwen(path, vocab=V, hidden=32, intermediate=64, layers=4, shards=shards)


def _to_megatron(rank, world, hf, out):
    """(The vision sizes apply to a Qwen2 source; an X-Omni source brings its own.)"""
    from megatron_xomni.conversion.convert import convert_hf_to_megatron

    convert_hf_to_megatron(hf, out, vision_layers=(2, 2), image_vocab_size=64, image_table_size=96)


def _reshard(rank, world, src, dst):
    """Load at TP=2 x PP=2 and save again from that layout."""
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint, save_checkpoint
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    par = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    pg = initialize_parallel(par)
    path = resolve_checkpoint(src)
    meta = read_metadata(path, "model_config")
    chunks = build_model_chunks(XOmniModelConfig.from_dict(meta), par, pg)
    load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks)))
    save_checkpoint(dst, 5, model_sharded_state_dict(chunks),
                    {"model_config": meta, "hf_config": read_metadata(path, "hf_config")})


def _export(rank, world, ckpt, out, layout):
    from megatron_xomni.conversion.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out, layout, max_shard_bytes=40_000)


def _state(rank, world, ckpt):
    from megatron_xomni.conversion.convert import load_megatron

    return load_megatron(ckpt)[0]


def _through_tp2_pp2(tmp_path, layout):
    """HF (tmp_path/hf) -> Megatron -> loaded at TP2 x PP2 and saved again -> HF; the export must equal the
    source bit for bit, dtype included. Returns (source tensors, exported tensors)."""
    run_ranks(_to_megatron, 1, str(tmp_path / "hf"), str(tmp_path / "mg"))
    run_ranks(_reshard, 4, str(tmp_path / "mg"), str(tmp_path / "mg_tp2pp2"))
    run_ranks(_export, 1, str(tmp_path / "mg_tp2pp2"), str(tmp_path / "back"), layout)
    src, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert set(src) == set(back)
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    return src, back


def test_qwen_round_trip_through_tp2_pp2_is_bit_exact(tmp_path):
    _write_qwen(tmp_path / "hf")
    _through_tp2_pp2(tmp_path, "qwen2")
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()  # streamed into shards
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "back").num_hidden_layers == 4

    # The new parts: image rows follow the text rows' statistics, vision blocks start as identity.
    (st,) = run_ranks(_state, 1, str(tmp_path / "mg"))
    text, image = st["embedding.word_embeddings.weight"][:V], st["image_embedding.word_embeddings.weight"]
    assert image.shape == (96, 32)
    padded = st["embedding.word_embeddings.weight"]
    assert padded.shape == (384, 32) and torch.count_nonzero(padded[V:]) == 0
    assert not any(torch.equal(image[i], image[i + 1]) for i in range(95))
    assert (image.mean(0) - text.mean(0)).abs().max() < 4 * text.std(0).max() / 96 ** 0.5
    assert torch.allclose(image.std(0), text.std(0), rtol=0.35)
    for i in (0, 1, 6, 7):  # adapter blocks 0,1 and head blocks 6,7 around LM layers 2..5
        assert torch.count_nonzero(st[f"decoder.layers.{i}.self_attention.linear_proj.weight"]) == 0
        assert torch.count_nonzero(st[f"decoder.layers.{i}.mlp.linear_fc2.weight"]) == 0
    assert torch.equal(st["decoder.layers.0.self_attention.linear_qkv.weight"],
                       st["decoder.layers.2.self_attention.linear_qkv.weight"])


def _expect_error(rank, world, hf, out):
    from megatron_xomni.conversion.convert import convert_hf_to_megatron
    from megatron_xomni.conversion.hf_io import ConversionError

    try:
        convert_hf_to_megatron(hf, out)
    except ConversionError as e:
        return str(e)
    return None


@pytest.mark.parametrize("breakage,needle", [
    ("missing_shard", "missing"),
    ("wrong_arch", "unsupported architecture"),
    ("rope_yarn", "RoPE scaling 'yarn'"),
    ("rope_linear_legacy", "RoPE scaling 'linear'"),
    ("shape", "shape"),
    ("unknown_name", "no mapping"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, breakage, needle):
    hf = tmp_path / "hf"
    _write_qwen(hf)
    if breakage == "missing_shard":
        next(iter(sorted(hf.glob("model-*.safetensors")))).unlink()
    elif breakage in ("wrong_arch", "rope_yarn", "rope_linear_legacy"):
        cfg = json.loads((hf / "config.json").read_text())
        if breakage == "wrong_arch":
            cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
        elif breakage == "rope_yarn":  # transformers >= 5 spelling
            cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                      "original_max_position_embeddings": 256}
        else:  # Qwen2.5's config.json spelling
            cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
        (hf / "config.json").write_text(json.dumps(cfg))
    else:
        shard = sorted(hf.glob("model-*.safetensors"))[-1]
        tensors = load_file(str(shard))
        if breakage == "shape":
            name = next(k for k in tensors if k.endswith("o_proj.weight"))
            tensors[name] = torch.zeros(3, 3)
        else:
            tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        for k in tensors:
            index["weight_map"][k] = shard.name
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    (msg,) = run_ranks(_expect_error, 1, str(hf), str(tmp_path / "out"))
    assert msg is not None and needle in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()


# ---- dtype and tied embeddings ------------------------------------------------------------------
def _quiet(fn, *args, **kwargs):
    """Run fn; return (result, the converter's stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = fn(*args, **kwargs)
    return out, [line for line in err.getvalue().splitlines() if line.startswith("[xomni convert]")]


def _import_export(rank, world, hf, mg, out):
    from megatron_xomni.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_megatron(hf, mg, vision_layers=(1, 1), image_vocab_size=64, image_table_size=96)
    return _quiet(convert_megatron_to_hf, mg, out, "qwen2")[1]


def _train_untied(rank, world, mg, run_dir, exports):
    """A stand-in training run initialised from `mg`: its lm_head moved by float32 steps (no longer equal
    to the embedding, nor bfloat16-exact), saved like a trainer saves (model_config + run_config)."""
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint, save_checkpoint
    from megatron_xomni.conversion.convert import convert_megatron_to_hf
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    path = resolve_checkpoint(mg)
    meta = read_metadata(path, "model_config")
    par = ParallelConfig()
    chunks = build_model_chunks(XOmniModelConfig.from_dict(meta), par, initialize_parallel(par))
    load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks)))
    head = chunks[0].output_layer.weight
    with torch.no_grad():
        head.add_(1e-3 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    save_checkpoint(run_dir, 10, model_sharded_state_dict(chunks),
                    {"model_config": meta, "run_config": {"name": "sft", "init_from": str(mg)}})
    lines = {dtype: _quiet(convert_megatron_to_hf, run_dir, exports[dtype], "qwen2",
                           dtype=None if dtype == "default" else getattr(torch, dtype))[1]
             for dtype in exports}
    return head.detach().clone(), lines


def test_bf16_tied_source_round_trips_in_bf16_and_tied(tmp_path):
    from transformers import AutoConfig, Qwen2ForCausalLM

    src_model = write_qwen(tmp_path / "hf", vocab=V, hidden=32, intermediate=64, layers=2, tied=True,
                           dtype=torch.bfloat16)
    (lines,) = run_ranks(_import_export, 1, str(tmp_path / "hf"), str(tmp_path / "mg"), str(tmp_path / "back"))
    src, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in src and set(src) == set(back)  # the tie is kept: no extra lm_head
    for k in src:
        assert back[k].dtype == torch.bfloat16 and torch.equal(src[k], back[k]), k
    cfg = AutoConfig.from_pretrained(tmp_path / "back")
    assert cfg.tie_word_embeddings and cfg.vocab_size == V and str(cfg.dtype).endswith("bfloat16")
    assert lines == ["[xomni convert] wrote bfloat16 weights (the source's dtype)"]
    # transformers ties it on load and computes what the source computes (both in float32 here)
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32, attn_implementation="eager")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, src_model(ids).logits)

    # A run trained from it untied the head in float32: the export says so, and which dtype it wrote.
    exports = {"default": str(tmp_path / "ex_default"), "float32": str(tmp_path / "ex_f32")}
    (head, lines) = run_ranks(_train_untied, 1, str(tmp_path / "mg"), str(tmp_path / "run"), exports)[0]
    assert lines["default"][0] == "[xomni convert] wrote bfloat16 weights (the source's dtype)"
    assert "1 tensors are not exactly representable in bfloat16" in lines["default"][1]
    assert "training untied the text embedding and lm_head" in lines["default"][2] and len(lines["default"]) == 3
    assert lines["float32"][0] == "[xomni convert] wrote float32 weights (--dtype)"
    for name, dtype in (("default", torch.bfloat16), ("float32", torch.float32)):
        out = _hf_tensors(exports[name])
        assert torch.equal(out["lm_head.weight"], head[:V].to(dtype)), name
        assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"].to(dtype))
        assert not AutoConfig.from_pretrained(exports[name]).tie_word_embeddings


# ---- the X-Omni layout through TP2 x PP2 ----------------------------------------------------------
def test_xomni_round_trip_through_tp2_pp2_is_bit_exact(tmp_path):
    """Released layout (bf16, a 300-id text vocabulary) -> Megatron -> TP2 x PP2 -> X-Omni layout."""
    write_released(tmp_path / "hf", vocab=V, mm_vocab=96, image_vocab=64, adap=1, lm=2, head=1, hidden=32,
                   dtype=torch.bfloat16)
    src, _ = _through_tp2_pp2(tmp_path, "xomni")
    assert all(t.dtype == torch.bfloat16 for t in src.values())
    cfg_src = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "mm_vocab_size", "image_vocab_size", "num_mm_adap_layers", "num_mm_head_layers",
                "num_hidden_layers", "mm_special_tokens", "rope_theta", "tie_word_embeddings", "torch_dtype"):
        assert cfg_back[key] == cfg_src[key], key

