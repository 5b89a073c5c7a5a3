"""The public Python API: the two things users script most.

1. Load a Megatron checkpoint at a layout and get text- or image-mode logits for token ids:

       from megatron_xomni.api import ParallelConfig, load_xomni, logits

       chunks, cfg = load_xomni("runs/sft/ckpt", ParallelConfig(tensor_parallel=2))   # under torchrun
       out = logits(chunks, [[12, 7, 99, 3]], mode="image")   # [1, 4, text_vocab + image_table], every rank

   A plain `python` process needs no setup (a one-rank TP=PP=1 world is started for you); under
   torchrun every rank makes the same calls. The checkpoint may have been saved at any layout.

2. Generate images for prompts from a bundle (model/ text_tokenizer/ image_tokenizer/ decoder/):

       from megatron_xomni.api import XOmniPipeline

       pipe = XOmniPipeline.from_bundle("bundle/")
       images = pipe.generate(["a red circle"], 64, 64, seeds=[0])   # list[PIL.Image] on rank 0, None elsewhere

Everything here is a stable name for something that lives in its own floor: `load_xomni` in
megatron_xomni.models.xomni.checkpoint, `mode_logits` in megatron_xomni.models.xomni.model,
`XOmniPipeline` in megatron_xomni.inference.pipeline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_xomni.inference.pipeline import XOmniPipeline
from megatron_xomni.inference.sampling import SamplingConfig
from megatron_xomni.models.xomni.checkpoint import load_xomni
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.models.xomni.model import mode_logits
from megatron_xomni.parallel import ParallelConfig

__all__ = ["ParallelConfig", "SamplingConfig", "XOmniModelConfig", "XOmniPipeline", "generate", "load_xomni", "logits",
           "mode_logits"]


def _model_cfg(chunks: list) -> XOmniModelConfig:
    m = chunks[0]
    while not hasattr(m, "model_cfg") and hasattr(m, "module"):
        m = m.module
    return m.model_cfg


def logits(chunks: list, token_ids: Sequence[Sequence[int]] | torch.Tensor, mode: str = "text",
           pg=None) -> torch.Tensor:
    """Next-token logits [batch, seq, text_vocab + image_table] (float32, on every rank) for rows of
    equal length, as X-Omni's released model returns them in `mode` ("text": the text head, every
    image id at the minimum; "image": the first image_vocab_size image-head logits at ids V + k,
    everything else at the minimum).

    Collective: every rank passes the same ids. Works at any TP/PP/VPP layout (the pipeline
    schedule runs the stages; the last stage's logits are broadcast over the pipeline group).
    Context parallelism splits the sequence and is not supported here."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_xomni.training.step import forward_logits

    if mode not in ("text", "image"):
        raise ValueError(f"mode must be 'text' or 'image', got {mode!r}")
    pg = pg or ProcessGroupCollection.use_mpu_process_groups()
    if pg.cp.size() > 1:
        raise ValueError("logits() runs whole sequences: load the model with context_parallel=1")
    if not torch.is_tensor(token_ids):
        lengths = sorted({len(row) for row in token_ids})
        if len(lengths) > 1:
            raise ValueError(f"rows of token_ids have different lengths {lengths}: pad them or call once per length")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty [batch, seq] list/tensor of equal-length rows, "
                         f"got shape {tuple(ids.shape)}")
    cfg = _model_cfg(chunks)
    width = cfg.text_vocab_size + cfg.image_table_size
    if int(ids.min()) < 0 or int(ids.max()) >= width:
        raise ValueError(f"token ids must lie in [0, {width}) (text vocabulary + image table)")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{ids.shape[1]} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
    device = next(chunks[0].parameters()).device
    batch = {"tokens": ids.to(device),
             "position_ids": torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids).contiguous()}
    out = forward_logits(chunks, [batch], pg)  # [full logits] on the last pipeline stage, [] elsewhere
    if out:
        full = out[0].float()
        result = mode_logits(full[..., :cfg.text_vocab_size], full[..., cfg.text_vocab_size:], mode,
                             cfg.image_vocab_size)
    else:
        result = torch.empty(*ids.shape, width, dtype=torch.float32, device=device)
    if pg.pp.size() > 1:
        last = torch.distributed.get_global_rank(pg.pp, pg.pp.size() - 1)
        torch.distributed.broadcast(result, src=last, group=pg.pp)
    return result


def generate(bundle: str, prompts: Sequence[str], height: int, width: int, seeds: int | Sequence[int] = 0,
             sampling: Optional[SamplingConfig] = None, iteration: Optional[int] = None, **kwargs):
    """One-shot `XOmniPipeline.from_bundle(bundle, iteration).generate(prompts, height, width, seeds, sampling,
    **kwargs)`; keep the pipeline instead when generating more than once (loading is the slow part)."""
    pipe = XOmniPipeline.from_bundle(bundle, iteration)
    return pipe.generate(prompts, height, width, seeds, sampling, **kwargs)
