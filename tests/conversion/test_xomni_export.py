"""`megatron-to-hf --layout xomni` of a run that started from Qwen2.5 carries what the released
XOmniForCausalLM reads, written from the run's own tokenizers and decoder, and the exported model
computes what the Megatron model computes (issue 15).

The run: a bf16 Qwen2 with a 520-id text vocabulary (padded to 640 on import) + the tiny SigLIP-VQ
tokenizer (256 codes) + the tiny image decoder. The export is loaded into the released-layout reference
(written from transformers' Qwen2 modules, built from the exported config.json alone).
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_xomni.conversion import ConversionError
from tests.conversion.hf_models import write_qwen
from tests.models.xomni.released_reference import RefXOmni
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
V, PADDED, CODES, TABLE, SEQ = 520, 640, 256, 320, 128
# The keyword arguments of the released SigLIP tokenizer class and any-resolution preprocess.
ENCODER_KEYS = {"siglip_name", "siglip_path", "projector_path", "z_channels", "codebook_size", "codebook_dim",
                "with_norm"}
TRANSFORM_KEYS = {"short_size", "long_size", "patch_size", "min_short_size", "max_aspect_ratio", "filtering"}


def _megatron_logits(rank, world, ckpt, ids):
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.models.xomni import XOmniModelConfig, mode_logits
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    par = ParallelConfig()
    path = resolve_checkpoint(ckpt)
    mcfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
    (model,) = build_model_chunks(mcfg, par, initialize_parallel(par))
    load_model_state([model], load_checkpoint(path, model_sharded_state_dict([model])))
    model.eval()
    with torch.no_grad():
        text, image = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, runtime_gather_output=True)
    return {m: mode_logits(text, image, m, mcfg.image_vocab_size) for m in ("text", "image")}


def _hf_ids():
    """Two sequences in the HF id space: 40 text tokens, then image codes (id V + k)."""
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, V, (2, SEQ), generator=g)
    image = V + torch.randint(0, CODES, (2, SEQ), generator=g)
    return torch.where(torch.arange(SEQ) >= 40, image, text)


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_tok_dir):
    from megatron_xomni.models.flux_decoder.config import decoder_config
    from megatron_xomni.models.flux_decoder.model import build_decoder
    from megatron_xomni.models.siglip_vq import tokenizer_config
    from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer

    root = tmp_path_factory.mktemp("xomni_export")
    qwen = write_qwen(root / "hf", vocab=V, hidden=64, layers=2, dtype=torch.bfloat16)
    image_tok = tokenizer_config("tiny")
    SiglipVQTokenizer(image_tok).save_pretrained(root / "image_tokenizer")
    build_decoder(decoder_config("tiny", "image", adapter_dim=image_tok.adapter_dim), seed=0).save_pretrained(root / "decoder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    import subprocess

    cli = [sys.executable, "-m", "megatron_xomni.cli", "convert"]
    for args in (["hf-to-megatron", "--hf", root / "hf", "--out", root / "mg", "--vision-layers", "1", "1",
                  "--image-vocab-size", str(CODES), "--image-table-size", str(TABLE)],
                 ["megatron-to-hf", "--ckpt", root / "mg", "--out", root / "export", "--layout", "xomni",
                  "--text-tokenizer", text_tok_dir, "--image-tokenizer", root / "image_tokenizer",
                  "--decoder", root / "decoder"]):
        res = subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    return SimpleNamespace(root=root, qwen=qwen, text_tok_dir=Path(text_tok_dir), image_tok=image_tok,
                           config=json.loads((root / "export" / "config.json").read_text()))


def test_config_carries_what_the_released_model_reads(run):
    from transformers import Qwen2Config

    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.models.flux_decoder.config import DecoderConfig

    cfg = run.config
    assert cfg["architectures"] == ["XOmniForCausalLM"] and cfg["model_type"] == "x-omni"
    assert (cfg["vocab_size"], cfg["mm_vocab_size"], cfg["image_vocab_size"]) == (V, TABLE, CODES)
    assert (cfg["num_mm_adap_layers"], cfg["num_mm_head_layers"], cfg["num_hidden_layers"]) == (1, 1, 4)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is False
    tok = XOmniTextTokenizer.load(run.text_tok_dir)
    assert cfg["mm_special_tokens"] == ["<SOM>", "<EOM>", "<IMAGE>"]
    assert [tok.encode(t) for t in cfg["mm_special_tokens"]] == [[tok.som_id], [tok.eom_id], [tok.image_id]]
    assert cfg["eos_token_id"] == tok.eos_id
    assert cfg["bos_token_id"] is None  # the tiny tokenizer has no BOS, nor had the source config

    # Read it the way the released init_vision does (transformers config, then SimpleNamespaces).
    loaded = Qwen2Config.from_pretrained(run.root / "export")
    vision = SimpleNamespace(**loaded.vision_config)
    assert vision.dtype == "bfloat16"
    assert set(vision.transform) == TRANSFORM_KEYS
    # tiny tokenizer: its position grid covers < 384 px, so the tiny preprocessing rules apply
    assert vision.transform == {"short_size": 64, "long_size": 192, "patch_size": 16, "min_short_size": 32,
                                "max_aspect_ratio": 3.0, "filtering": True}
    assert set(vision.encoder) == ENCODER_KEYS  # passed as **kwargs: no other key may be there
    saved_tok = json.loads((run.root / "image_tokenizer" / "config.json").read_text())
    enc = SimpleNamespace(**vision.encoder)
    assert (enc.codebook_size, enc.codebook_dim, enc.z_channels) == (
        saved_tok["codebook_size"], saved_tok["codebook_dim"], saved_tok["adapter_dim"])
    assert Path(enc.siglip_path).is_file() and Path(enc.projector_path).is_file()
    dec = SimpleNamespace(**vision.decoder)
    saved_dec = DecoderConfig.from_json(run.root / "decoder" / "decoder_config.json")
    assert (Path(dec.model_path) / "config.json").is_file()
    assert (dec.upscale_factor, dec.num_inference_steps, dec.cfg_scale, dec.cfg_scale_2) == (
        16, saved_dec.num_inference_steps, 1.0, 1.0)


@pytest.fixture(scope="module")
def logits(run):
    ids = _hf_ids()
    ref = RefXOmni.from_folder(run.root / "export")  # only the exported files, read as the released code reads
    with torch.no_grad():
        expected = {m: ref(ids, m) for m in ("text", "image")}
        qwen = run.qwen(ids[:, :40]).logits
    megatron_ids = torch.where(ids >= V, ids - V + PADDED, ids)  # image code k is PADDED + k inside Megatron
    (got,) = run_ranks(_megatron_logits, 1, str(run.root / "mg"), megatron_ids)
    return expected, got, qwen


def test_exported_text_logits_match_the_megatron_model_and_the_source(logits):
    expected, got, qwen = logits
    # measured max |diff| 2.5e-5 on logits up to 14.3 (float32 round-off, different kernels)
    assert (got["text"][..., :V] - expected["text"][..., :V]).abs().max().item() < 5e-5
    assert torch.isneginf(got["text"][..., V:PADDED]).all()  # the padding, gone from the export
    # vision blocks start as identity: on text the export computes what the Qwen source computes
    assert (expected["text"][:, :40, :V] - qwen).abs().max().item() < 1e-6  # measured: 0 (same modules)


def test_exported_image_logits_match_the_megatron_model(logits):
    expected, got, _ = logits
    ref_codes = expected["image"][..., V:V + CODES]
    assert (got["image"][..., PADDED:PADDED + CODES] - ref_codes).abs().max().item() < 5e-5  # measured 2.1e-5
    assert ref_codes.std() > 1.0  # non-degenerate: the comparison is not between near-constant logits


def test_the_xomni_layout_asks_for_the_run_parts(run):
    from megatron_xomni.conversion.convert import convert_megatron_to_hf
    from megatron_xomni.conversion.xomni_fields import RunParts

    cases = [
        (RunParts(), "needs vision_config: pass the run's --text-tokenizer"),
        (RunParts(image_tokenizer=str(run.root / "image_tokenizer")), "pass --text-tokenizer, --image-tokenizer and --decoder together"),
        (RunParts(str(run.text_tok_dir), str(run.root / "decoder"), str(run.root / "decoder")), "image tokenizer"),
    ]
    for parts, needle in cases:
        with pytest.raises(ConversionError) as e:
            convert_megatron_to_hf(run.root / "mg", run.root / "refused", "xomni", parts=parts, require_vision=True)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not list(run.root.glob("refused*"))
