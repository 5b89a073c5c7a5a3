"""LLaVA-style training of the SigLIP-VQ tokenizer against a frozen text LLM (X-Omni section 1): the pieces.

X-Omni trains its tokenizer on image *understanding*, not pixel reconstruction: the quantized,
adapted features of an image go through a projector into a frozen LLM, which must then predict
the image's caption (and answers to questions about it). The gradient of that next-token loss is
what shapes the encoder, the codebook and the adapter.

    sequence  = [proj(tok(pixels)) : N image embeddings] + caption + " " + "Q A." pairs + EOS
    loss      = sum of CE over the text targets / number of text targets   (+ aux_loss_weight * VQ loss)

What trains: the quantizer (codebook + pre-quant conv), the adapter, the projector and, unless
`tokenizer.freeze_encoder`, the ViT. What does not: the LLM, the project's own megatron-core XOmniModel
(TP=1, PP=1). Its image blocks are never active here: the image slots carry a *text* placeholder id, so
the model runs as the plain text LM it is in X-Omni (Qwen2.5 there).

The teacher. A frozen *randomly initialised* LLM is a weak teacher: its next-token distribution does
not depend on content, so the projector has little to align with. `teacher.checkpoint` loads a trained
one (a megatron dist-ckpt root, e.g. a converted Qwen2.5-1.5B, or a teacher folder written here);
`teacher.warmup_steps > 0` first trains the LLM as a text-only LM on the corpus' captions and QA text
for that many steps (a few hundred suffice for the tiny world) and then freezes it. The warmed teacher
is saved to <save_dir>/teacher/ and reused on resume.

This module holds the projector, the teacher, the loss, the warm-up and the evaluation; the run config
is training/siglip_vq_config.py, the trainer on the shared substrate training/siglip_vq_trainer.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_xomni.data.caption_batches import encode_texts, sample_text
from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
from megatron_xomni.models.siglip_vq.quantizer import code_stats

PROJECTOR_NAME = "projector.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
TEACHER_CONFIG = "model_config.json"


# ---------------------------------------------------------------------------------------------- modules
def make_projector(kind: str, in_dim: int, hidden: int) -> nn.Module:
    """LLaVA projector from adapter features to LLM input embeddings."""
    if kind == "linear":
        return nn.Linear(in_dim, hidden)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class TokenizerWithProjector(nn.Module):
    """The trainable part: tokenizer + projector (+ the tiny preset's optional pixel head), one module so
    DDP syncs all of them. With a pixel head, aux["pixels"] is its reconstruction from the adapter features."""

    def __init__(self, tok: SiglipVQTokenizer, projector: nn.Module, pixel_head: nn.Module | None = None) -> None:
        super().__init__()
        self.tok = tok
        self.projector = projector
        self.pixel_head = pixel_head

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        feats, aux = self.tok(pixels)
        if self.pixel_head is not None:
            aux["pixels"] = self.pixel_head(feats, aux["grid"])
        return self.projector(feats), aux


def build_llm(teacher, seed: int, pg_collection):
    """The frozen LLM (one XOmniModel, TP=1, PP=1) of a TeacherSection, before any warm-up."""
    from megatron.core import tensor_parallel

    from megatron_xomni.models.xomni import XOmniModelConfig, model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig

    # same random init in every process whatever ran before (loaded weights overwrite it anyway)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ckpt = Path(teacher.checkpoint) if teacher.checkpoint else None
    if ckpt is not None and (ckpt / TEACHER_WEIGHTS).is_file():
        mcfg = XOmniModelConfig.from_dict(json.loads((ckpt / TEACHER_CONFIG).read_text()))
        (llm,) = build_model_chunks(mcfg, ParallelConfig(), pg_collection)
        load_teacher_weights(llm, ckpt)
    elif ckpt is not None:
        from megatron_xomni.checkpointing import read_metadata
        from megatron_xomni.models.xomni.checkpoint import checkpoint_folder, load_xomni

        path = checkpoint_folder(ckpt)
        saved = read_metadata(path, "model_config")
        mcfg = XOmniModelConfig.from_dict(saved) if saved else model_preset(teacher.preset)
        (llm,), _ = load_xomni(path, ParallelConfig(), pg_collection, model_config=mcfg)
    else:
        (llm,) = build_model_chunks(model_preset(teacher.preset), ParallelConfig(), pg_collection)
    return llm


def _tensor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # megatron modules add non-tensor `_extra_state` entries; the weights are the tensors
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def save_teacher(llm, directory: str | Path) -> Path:
    """Write a (TP=1) LLM as teacher.safetensors + model_config.json, crash-safely: the folder appears
    complete or not at all (written to <directory>.tmp, then renamed)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.cpu() for k, v in _tensor_state(llm).items()}, str(tmp / TEACHER_WEIGHTS),
              metadata={"format": "pt"})
    (tmp / TEACHER_CONFIG).write_text(json.dumps(llm.model_cfg.to_dict(), indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_teacher_weights(llm, directory: str | Path) -> None:
    state = load_file(str(Path(directory) / TEACHER_WEIGHTS))
    expected = set(_tensor_state(llm))
    if set(state) != expected:
        raise ValueError(f"{directory}: teacher weights do not match the model (missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    llm.load_state_dict(state, strict=False)


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# ---------------------------------------------------------------------------------------------- loss
def lm_loss_sum(llm, text_ids: torch.Tensor, text_mask: torch.Tensor,
                prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token CE over the text targets, number of targets) for [prefix] + text.

    prefix: [B, N, hidden] input embeddings (the projected image features) or None. With a prefix
    every text token is a target (the first is predicted from the last image slot); without one the
    first text token is context only.
    """
    b, t = text_ids.shape
    dev = text_ids.device
    n = 0 if prefix is None else prefix.shape[1]
    s = n + t
    position_ids = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    # placeholder id 0 (a text id) in the image slots: the model's image blocks stay inactive
    tokens = torch.cat([torch.zeros(b, n, dtype=torch.long, device=dev), text_ids], dim=1)
    embeds = llm.embedding(input_ids=text_ids, position_ids=position_ids[:, n:])  # [t, b, hidden]
    if prefix is not None:
        embeds = torch.cat([prefix.transpose(0, 1).to(embeds.dtype), embeds], dim=0)
    labels = torch.zeros(b, s, dtype=torch.long, device=dev)
    target_mask = torch.zeros(b, s, device=dev)
    first = max(n - 1, 0)  # position whose output predicts the first target
    skip = 0 if n > 0 else 1
    labels[:, first: first + t - skip] = text_ids[:, skip:]
    target_mask[:, first: first + t - skip] = text_mask[:, skip:]
    per_token = llm(tokens, position_ids, None, labels=labels, decoder_input=embeds.contiguous())
    return (per_token * target_mask).sum(), target_mask.sum()


# ---------------------------------------------------------------------------------------------- warm-up
def warmup_llm(llm, text_tok, texts: list[str], teacher, seed: int, max_text_tokens: int,
               log: Callable[[str], None] = print) -> list[float]:
    """Train the LLM as a text-only LM on `texts` for teacher.warmup_steps steps; returns the losses.

    Every rank runs the same steps on the same texts (the result is then broadcast from rank 0,
    so replicas are bit-identical whatever the reduction order)."""
    gen = torch.Generator().manual_seed(seed + 7)
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=teacher.warmup_lr, weight_decay=0.0)
    dev = params[0].device
    llm.train()
    losses = []
    for step in range(teacher.warmup_steps):
        pick = torch.randint(len(texts), (teacher.warmup_batch_size,), generator=gen).tolist()
        ids, mask = encode_texts(text_tok, [texts[i] for i in pick], max_text_tokens)
        total, count = lm_loss_sum(llm, ids.to(dev), mask.to(dev))
        loss = total / count.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, teacher.warmup_steps // 5) == 0 or step == 0:
            log(f"[teacher warm-up] step {step + 1}/{teacher.warmup_steps} text loss {loss.item():.4f}")
    broadcast_module(llm)
    return losses


# ---------------------------------------------------------------------------------------------- eval
def _same_size_chunks(eval_set: list, batch_size: int):
    """Consecutive samples of one image size, at most batch_size at a time (any-res sets mix sizes)."""
    chunk: list = []
    for item in eval_set:
        if chunk and (len(chunk) == batch_size or item[0].shape != chunk[0][0].shape):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate(trainee: TokenizerWithProjector, llm, text_tok, eval_set: list, max_qa_pairs: int,
             max_text_tokens: int, batch_size: int = 32) -> dict[str, float]:
    """Caption(+QA) loss on eval_set ((pixels, caption, meta) triples), the same loss with images
    shuffled within the batch (how much the text depends on the image), and codebook usage /
    perplexity of the hard codes. Changes no state: the quantizer's usage counters are kept as they were."""
    was_training = trainee.training
    trainee.eval()
    dev = next(trainee.parameters()).device
    tot, tot_shuf, cnt = 0.0, 0.0, 0.0
    counts = torch.zeros(trainee.tok.cfg.codebook_size, dtype=torch.long)
    for chunk in _same_size_chunks(eval_set, batch_size):
        pixels = torch.stack([c[0] for c in chunk]).to(dev)
        ids, mask = encode_texts(text_tok, [sample_text(c[1], c[2], max_qa_pairs) for c in chunk], max_text_tokens)
        ids, mask = ids.to(dev), mask.to(dev)
        embeds, aux = trainee(pixels)
        counts += torch.bincount(aux["codes"].flatten().cpu(), minlength=counts.numel())
        s, c = lm_loss_sum(llm, ids, mask, embeds)
        s2, _ = lm_loss_sum(llm, ids, mask, embeds.roll(1, dims=0))
        tot, tot_shuf, cnt = tot + float(s), tot_shuf + float(s2), cnt + float(c)
    usage, ppl = code_stats(counts)
    trainee.train(was_training)
    return {"loss": tot / cnt, "loss_shuffled": tot_shuf / cnt, "usage_fraction": float(usage),
            "perplexity": float(ppl)}

