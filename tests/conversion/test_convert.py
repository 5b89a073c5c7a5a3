"""HF <-> Megatron conversion: bit-exact round trips through a TP=2 x PP=2 layout, real
initialisation of the new parts, and clear errors (with nothing partial written) on bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.multirank import run_ranks

V = 256


def _write_qwen(path, shards=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    size = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True, max_shard_size=f"{size // shards // 1000 + 1}KB")
    return model


def _hf_tensors(path):
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _to_megatron(rank, world, hf, out):
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


def test_qwen_round_trip_through_tp2_pp2_is_bit_exact(tmp_path):
    _write_qwen(tmp_path / "hf")
    run_ranks(_to_megatron, 1, str(tmp_path / "hf"), str(tmp_path / "mg"))
    run_ranks(_reshard, 4, str(tmp_path / "mg"), str(tmp_path / "mg_tp2pp2"))
    run_ranks(_export, 1, str(tmp_path / "mg_tp2pp2"), str(tmp_path / "back"), "qwen2")
    src, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert set(src) == set(back)
    for k in src:
        assert torch.equal(src[k], back[k]), k
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()  # streamed into shards
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "back").num_hidden_layers == 4

    # The new parts: image rows follow the text rows' statistics, vision blocks start as identity.
    (st,) = run_ranks(_state, 1, str(tmp_path / "mg"))
    text, image = st["embedding.word_embeddings.weight"], st["image_embedding.word_embeddings.weight"]
    assert image.shape == (96, 32)
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
    ("shape", "shape"),
    ("unknown_name", "no mapping"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, breakage, needle):
    hf = tmp_path / "hf"
    _write_qwen(hf)
    if breakage == "missing_shard":
        next(iter(sorted(hf.glob("model-*.safetensors")))).unlink()
    elif breakage == "wrong_arch":
        cfg = json.loads((hf / "config.json").read_text())
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
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
    assert not (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()
    assert not list((tmp_path / "out").glob("iter_*")) if (tmp_path / "out").exists() else True
