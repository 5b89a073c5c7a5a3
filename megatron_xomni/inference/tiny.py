"""A random tiny bundle (model, text tokenizer, image tokenizer, decoder) for tests, benchmarks and smoke runs.

Nothing here is trained except the sentencepiece text tokenizer (on built-in world captions): the point
is a bundle with the real file layouts and real shapes that loads and runs end to end in seconds.
Weights are drawn with a fixed generator, so the same seed gives the same bundle.
"""
from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_bundle(out: str | Path, seed: int = 0, weight_std: float = 0.15, num_texts: int = 120,
                      decoder_variant: str = "text") -> Path:
    """Write `out/{model,text_tokenizer,image_tokenizer,decoder}`; returns `out`.

    Needs an initialised single-rank parallel state (`init_process_group()`), because the model is
    saved as a megatron-core dist checkpoint. `weight_std`: std of the random AR weights (large enough
    that the sampling distributions are peaked, as a trained model's are). The decoder's semantic
    projection is made non-zero so that different codes give different images.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.models.xomni.checkpoint import model_sharded_state_dict
    from megatron_xomni.parallel import ParallelConfig
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mcfg = model_preset("tiny")

    spm = train_sentencepiece(world_texts(num_texts, seed=seed), out / "text_tokenizer" / "spm",
                              vocab_size=mcfg.text_vocab_size)
    XOmniTextTokenizer.from_sentencepiece(spm).save(out / "text_tokenizer")

    pg = ProcessGroupCollection.use_mpu_process_groups()
    chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * weight_std)
    save_checkpoint(out / "model", 0, model_sharded_state_dict(chunks), {"model_config": mcfg.to_dict()})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_tok = SiglipVQTokenizer(tokenizer_config("tiny", codebook_size=mcfg.image_vocab_size))
    image_tok.save_pretrained(out / "image_tokenizer")

    dec = build_decoder(decoder_config("tiny", decoder_variant, adapter_dim=image_tok.cfg.adapter_dim), seed=seed)
    with torch.no_grad():
        w = dec.transformer.semantic_proj.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    dec.save_pretrained(out / "decoder")
    return out
