"""LLaVA-style training of the SigLIP-VQ tokenizer against a frozen text LLM (X-Omni section 1).

X-Omni trains its tokenizer on image *understanding*, not pixel reconstruction: the quantized,
adapted features of an image go through a projector into a frozen LLM, which must then predict
the image's caption (and answers to questions about it). The gradient of that next-token loss is
what shapes the encoder, the codebook and the adapter.

    sequence  = [proj(tok(pixels)) : N image embeddings] + caption + " " + "Q A." pairs + EOS
    loss      = sum of CE over the text targets / number of text targets   (+ aux_loss_weight * VQ loss)

What trains: the quantizer (codebook + pre-quant conv), the adapter, the projector and, unless
`freeze_encoder`, the ViT. What does not: the LLM, the project's own megatron-core XOmniModel (TP=1,
PP=1). Its image blocks are never active here: the image slots carry a *text* placeholder id, so the
model runs as the plain text LM it is in X-Omni (Qwen2.5 there).

The teacher. A frozen *randomly initialised* LLM is a weak teacher: its next-token distribution does
not depend on content, so the projector has little to align with. `llm_checkpoint` loads a trained
one (a megatron dist-ckpt root written by the main trainer, or a teacher file written here);
`llm_warmup_steps > 0` first trains the LLM as a text-only LM on the corpus' captions and QA text for
that many steps (a few hundred suffice for the tiny world) and then freezes it. The warmed teacher is
saved to out/teacher/ and reused on resume.

Codebook health. Every `reseed_every` steps, codes chosen fewer than `reseed_min_count` times during
those steps (counts summed over all ranks) are re-seeded by `IndexBackpropQuantizer.reseed_dead_codes`
(each onto a random recent encoder feature, rank 0's choice broadcast) and the AdamW moments of their
rows are zeroed so stale momentum does not drag them back; usage counts then restart. `reseed_until`
stops re-seeding late in training so the final codebook settles.

Data parallelism. Tokenizer + projector are wrapped in torch DDP (gloo on CPU); the frozen LLM is
replicated (rank 0's weights broadcast). The global batch `batch_size` is split over ranks by the
corpus reader's deterministic record/shard split, and the caption loss is normalised by the *global*
number of text targets, so K ranks compute exactly the gradient one rank computes on the whole batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_xomni.models.siglip_vq.config import tokenizer_config
from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
from megatron_xomni.data.caption_batches import CaptionBatches, corpus_texts, encode_texts, sample_text, world_eval_set  # noqa: F401 (re-exported)
from megatron_xomni.models.siglip_vq.quantizer import code_stats

PROJECTOR_NAME = "projector.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
TEACHER_CONFIG = "model_config.json"
LATEST = "latest.txt"
KEEP_CHECKPOINTS = 2  # resumable checkpoints kept in out/checkpoints (older ones are deleted)


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer training run depends on (saved with every checkpoint)."""

    tokenizer_preset: str = "tiny"
    """`tokenizer_config` preset of the tokenizer to train ("tiny" or "xomni")."""
    tokenizer_overrides: dict = field(default_factory=dict)
    """SigLIPVQConfig fields overriding the preset (e.g. {"skip_quant_prob": 0.0})."""
    init_tokenizer: str | None = None
    """Start from a save_pretrained folder instead of a random tokenizer."""
    siglip_weights: str | None = None
    """Initialise the encoder from a local SigLIP/SigLIP2 safetensors file."""
    freeze_encoder: bool = False
    """Keep the ViT fixed and train only quantizer + adapter + projector."""
    llm_preset: str = "tiny"
    """`model_preset` of the frozen LLM (ignored when llm_checkpoint carries its own config)."""
    llm_checkpoint: str | None = None
    """A trained LLM: a teacher folder written here, or a megatron dist-ckpt root of the main trainer."""
    llm_warmup_steps: int = 0
    """Text-only LM steps on the corpus' texts before freezing the LLM (0: use it as loaded)."""
    llm_warmup_lr: float = 2e-3
    """AdamW learning rate of the warm-up."""
    llm_warmup_batch_size: int = 32
    """Texts per warm-up step."""
    llm_warmup_records: int = 2000
    """Corpus records whose caption + QA texts form the warm-up set."""
    projector: str = "mlp"
    """"mlp" (LLaVA-1.5: Linear, GELU, Linear) or "linear" (LLaVA-1)."""
    steps: int = 1000
    """Optimizer steps of tokenizer training."""
    batch_size: int = 16
    """Global batch (images per step over all ranks); must be a multiple of the world size."""
    lr: float = 1e-3
    """AdamW peak learning rate (tokenizer + projector)."""
    lr_warmup_steps: int = 20
    """Linear learning-rate warm-up, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    aux_loss_weight: float = 1.0
    """Weight of the quantizer loss (index + codebook + commitment) added to the caption loss."""
    max_qa_pairs: int = 8
    """Question/answer pairs of meta["qa"] appended to the caption (0: caption only)."""
    max_text_tokens: int = 128
    """Text tokens per sample, EOS included (longer texts are cut)."""
    reseed_every: int = 50
    """Re-seed dead codes every this many steps (0 disables)."""
    reseed_min_count: int = 1
    """A code is dead when chosen fewer times than this since the last re-seed (all ranks)."""
    reseed_until: int | None = None
    """Last step at which re-seeding may happen (None: until the end)."""
    log_every: int = 10
    """Console/TensorBoard logging period in steps."""
    save_every: int = 0
    """Resumable checkpoint period in steps (0: only at the end)."""
    seed: int = 0
    """Seeds initialisation, the warm-up and quantizer randomness (per rank: seed + rank)."""

    def __post_init__(self) -> None:
        if self.projector not in ("mlp", "linear"):
            raise ValueError(f"projector={self.projector!r}: use 'mlp' or 'linear'")
        for name in ("steps", "batch_size", "max_text_tokens", "log_every", "llm_warmup_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerTrainConfig":
        from megatron_xomni.dataclass_utils import strict_from_dict

        return strict_from_dict(cls, data)


# ---------------------------------------------------------------------------------------------- modules
def make_projector(kind: str, in_dim: int, hidden: int) -> nn.Module:
    """LLaVA projector from adapter features to LLM input embeddings."""
    if kind == "linear":
        return nn.Linear(in_dim, hidden)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


class TokenizerWithProjector(nn.Module):
    """The trainable part: tokenizer + projector, one module so DDP syncs both."""

    def __init__(self, tok: SiglipVQTokenizer, projector: nn.Module) -> None:
        super().__init__()
        self.tok = tok
        self.projector = projector

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        feats, aux = self.tok(pixels)
        return self.projector(feats), aux


def build_llm(cfg: TokenizerTrainConfig, pg_collection):
    """The frozen LLM (one XOmniModel, TP=1, PP=1) with its weights, before any warm-up."""
    from megatron_xomni.models.xomni import XOmniModelConfig, model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig

    from megatron.core import tensor_parallel

    # same random init in every process whatever ran before (loaded weights overwrite it anyway)
    torch.manual_seed(cfg.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    ckpt = Path(cfg.llm_checkpoint) if cfg.llm_checkpoint else None
    if ckpt is not None and (ckpt / TEACHER_WEIGHTS).is_file():
        mcfg = XOmniModelConfig.from_dict(json.loads((ckpt / TEACHER_CONFIG).read_text()))
        (llm,) = build_model_chunks(mcfg, ParallelConfig(), pg_collection)
        load_teacher_weights(llm, ckpt)
    elif ckpt is not None:
        from megatron_xomni.checkpointing import read_metadata
        from megatron_xomni.models.xomni.checkpoint import checkpoint_folder, load_xomni

        path = checkpoint_folder(ckpt)
        saved = read_metadata(path, "model_config")
        mcfg = XOmniModelConfig.from_dict(saved) if saved else model_preset(cfg.llm_preset)
        (llm,), _ = load_xomni(path, ParallelConfig(), pg_collection, model_config=mcfg)
    else:
        (llm,) = build_model_chunks(model_preset(cfg.llm_preset), ParallelConfig(), pg_collection)
    return llm


def _tensor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # megatron modules add non-tensor `_extra_state` entries; the weights are the tensors
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def save_teacher(llm, directory: str | Path) -> Path:
    """Write a (TP=1) LLM as teacher.safetensors + model_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_tensor_state(llm), str(directory / TEACHER_WEIGHTS), metadata={"format": "pt"})
    (directory / TEACHER_CONFIG).write_text(json.dumps(llm.model_cfg.to_dict(), indent=2) + "\n")
    return directory


def load_teacher_weights(llm, directory: str | Path) -> None:
    state = load_file(str(Path(directory) / TEACHER_WEIGHTS))
    expected = set(_tensor_state(llm))
    if set(state) != expected:
        raise ValueError(f"{directory}: teacher weights do not match the model (missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    llm.load_state_dict(state, strict=False)


def _broadcast_module(module: nn.Module) -> None:
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
    n = 0 if prefix is None else prefix.shape[1]
    s = n + t
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # placeholder id 0 (a text id) in the image slots: the model's image blocks stay inactive
    tokens = torch.cat([torch.zeros(b, n, dtype=torch.long), text_ids], dim=1)
    embeds = llm.embedding(input_ids=text_ids, position_ids=position_ids[:, n:])  # [t, b, hidden]
    if prefix is not None:
        embeds = torch.cat([prefix.transpose(0, 1).to(embeds.dtype), embeds], dim=0)
    labels = torch.zeros(b, s, dtype=torch.long)
    target_mask = torch.zeros(b, s)
    first = max(n - 1, 0)  # position whose output predicts the first target
    skip = 0 if n > 0 else 1
    labels[:, first: first + t - skip] = text_ids[:, skip:]
    target_mask[:, first: first + t - skip] = text_mask[:, skip:]
    per_token = llm(tokens, position_ids, None, labels=labels, decoder_input=embeds.contiguous())
    return (per_token * target_mask).sum(), target_mask.sum()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1



# ---------------------------------------------------------------------------------------------- warm-up
def warmup_llm(llm, text_tok, texts: list[str], cfg: TokenizerTrainConfig, log: Callable[[str], None] = print) -> list[float]:
    """Train the LLM as a text-only LM on `texts` for cfg.llm_warmup_steps steps; returns the losses.

    Every rank runs the same steps on the same texts (the result is then broadcast from rank 0,
    so replicas are bit-identical whatever the reduction order)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.llm_warmup_lr, weight_decay=0.0)
    llm.train()
    losses = []
    for step in range(cfg.llm_warmup_steps):
        pick = torch.randint(len(texts), (cfg.llm_warmup_batch_size,), generator=gen).tolist()
        ids, mask = encode_texts(text_tok, [texts[i] for i in pick], cfg.max_text_tokens)
        total, count = lm_loss_sum(llm, ids, mask)
        loss = total / count.clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.llm_warmup_steps // 5) == 0 or step == 0:
            log(f"[llm warm-up] step {step + 1}/{cfg.llm_warmup_steps} text loss {loss.item():.4f}")
    _broadcast_module(llm)
    return losses


# ---------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(trainee: TokenizerWithProjector, llm, text_tok, eval_set: list, cfg: TokenizerTrainConfig,
             batch_size: int = 32) -> dict[str, float]:
    """Caption(+QA) loss on eval_set, the same loss with images shuffled within the batch (how much
    the text depends on the image), and codebook usage / perplexity of the hard codes."""
    was_training = trainee.training
    trainee.eval()
    tot, tot_shuf, cnt = 0.0, 0.0, 0.0
    counts = torch.zeros(trainee.tok.cfg.codebook_size, dtype=torch.long)
    for i in range(0, len(eval_set), batch_size):
        chunk = eval_set[i: i + batch_size]
        pixels = torch.stack([c[0] for c in chunk])
        ids, mask = encode_texts(text_tok, [sample_text(c[1], c[2], cfg.max_qa_pairs) for c in chunk],
                                 cfg.max_text_tokens)
        embeds, aux = trainee(pixels)
        counts += torch.bincount(aux["codes"].flatten(), minlength=counts.numel())
        s, c = lm_loss_sum(llm, ids, mask, embeds)
        s2, _ = lm_loss_sum(llm, ids, mask, embeds.roll(1, dims=0))
        tot, tot_shuf, cnt = tot + float(s), tot_shuf + float(s2), cnt + float(c)
    usage, ppl = code_stats(counts)
    trainee.train(was_training)
    return {"loss": tot / cnt, "loss_shuffled": tot_shuf / cnt, "usage_fraction": float(usage),
            "perplexity": float(ppl)}


# ---------------------------------------------------------------------------------------------- training
def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _lr_at(cfg: TokenizerTrainConfig, step: int) -> float:
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    return cfg.lr


def _load_text_tokenizer(text_tokenizer, out_dir: Path | None, rank: int):
    """An XOmniTextTokenizer: the given one, a folder to load, or sentencepiece trained on the world."""
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts

    if isinstance(text_tokenizer, XOmniTextTokenizer):
        return text_tokenizer
    if text_tokenizer is not None:
        return XOmniTextTokenizer.load(text_tokenizer)
    # no tokenizer given: the tiny world's sentencepiece (deterministic, so every rank trains the same)
    folder = (out_dir / "text_tokenizer") if out_dir is not None else None
    if folder is not None and (folder / "text_tokenizer.json").is_file():
        return XOmniTextTokenizer.load(folder)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok = XOmniTextTokenizer.from_sentencepiece(train_sentencepiece(world_texts(2000), Path(tmp) / "spm", 512))
    if folder is not None and rank == 0:
        tok.save(folder)
    return tok


class TokenizerTrainer:
    """Runs tokenizer training on this rank; call after `initialize_parallel(ParallelConfig())`.

        trainer = TokenizerTrainer(cfg, corpus_dir, out_dir, pg_collection, text_tokenizer=None, eval_set=...)
        result = trainer.train()   # {"eval_before": {...}, "eval_after": {...}, "history": [...]}
    """

    def __init__(self, cfg: TokenizerTrainConfig, corpus, out_dir: str | Path | None, pg_collection,
                 text_tokenizer=None, eval_set: list | None = None, resume: bool = True,
                 log: Callable[[str], None] = print, tensorboard: bool = True) -> None:
        self.cfg = cfg
        self.rank, self.world = _rank_world()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of the {self.world} ranks; "
                             f"use a multiple of {self.world}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log = log if self.rank == 0 else (lambda msg: None)
        self.text_tok = _load_text_tokenizer(text_tokenizer, self.out_dir, self.rank)
        self.eval_set = eval_set or []

        # ---- frozen LLM (warm-up first when asked; a saved warmed teacher is reused on resume)
        teacher_dir = self.out_dir / "teacher" if self.out_dir is not None else None
        if teacher_dir is not None and resume and (teacher_dir / TEACHER_WEIGHTS).is_file():
            cfg_llm = dataclasses.replace(cfg, llm_checkpoint=str(teacher_dir))
            self.llm = build_llm(cfg_llm, pg_collection)
            self.log(f"teacher LLM loaded from {teacher_dir}")
        else:
            self.llm = build_llm(cfg, pg_collection)
            _broadcast_module(self.llm)
            self.text_tok.check_text_vocab(self.llm.model_cfg.text_vocab_size)
            self.warmup_losses: list[float] = []
            if cfg.llm_warmup_steps > 0:
                torch.manual_seed(cfg.seed)
                texts = corpus_texts(corpus, cfg.llm_warmup_records, cfg.max_qa_pairs)
                self.warmup_losses = warmup_llm(self.llm, self.text_tok, texts, cfg, self.log)
                if teacher_dir is not None and self.rank == 0:
                    save_teacher(self.llm, teacher_dir)
        self.text_tok.check_text_vocab(self.llm.model_cfg.text_vocab_size)
        self.llm.requires_grad_(False)
        self.llm.eval()

        # ---- trainable tokenizer + projector (same init on every rank; DDP broadcasts rank 0's anyway)
        torch.manual_seed(cfg.seed)
        overrides = {**cfg.tokenizer_overrides, "freeze_encoder": cfg.freeze_encoder}
        if cfg.init_tokenizer:
            tok = SiglipVQTokenizer.from_pretrained(cfg.init_tokenizer, **overrides)
        else:
            tok = SiglipVQTokenizer(tokenizer_config(cfg.tokenizer_preset, **overrides))
        if cfg.siglip_weights:
            tok.load_siglip_weights(cfg.siglip_weights)
        projector = make_projector(cfg.projector, tok.cfg.adapter_dim, self.llm.config.hidden_size)
        self.trainee = TokenizerWithProjector(tok, projector)
        self.params = [p for p in self.trainee.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if dist.is_initialized():
            # broadcast_buffers=False: each rank keeps its own code-usage counts and feature ring buffer
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.trainee, broadcast_buffers=False)
        else:
            self.ddp = self.trainee
        self.step = 0
        self.history: list[dict] = []
        if resume and self.out_dir is not None:
            self._maybe_resume()
        # quantizer randomness (skipped samples) must differ between ranks
        if self.step == 0:
            torch.manual_seed(cfg.seed + 1000 * self.rank + 1)
        self.batches = CaptionBatches(corpus, cfg.batch_size // self.world, cfg.max_qa_pairs, seed=cfg.seed)
        self.batches.skip(self.step)
        self.tb = None
        if tensorboard and self.rank == 0 and self.out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tb"))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        pixels, texts = next(self.batches)
        ids, mask = encode_texts(self.text_tok, texts, cfg.max_text_tokens)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(cfg, self.step)
        embeds, aux = self.ddp(pixels)
        ce_sum, count = lm_loss_sum(self.llm, ids, mask, embeds)
        global_count = count.detach().clone()
        if self.world > 1:
            dist.all_reduce(global_count)
        # DDP averages gradients over ranks, so scale by world: the result is sum(CE) / global targets
        caption_loss = ce_sum / global_count.clamp_min(1) * self.world
        loss = caption_loss + cfg.aux_loss_weight * aux["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        self.opt.step()
        self.step += 1
        stats = torch.tensor([ce_sum.item(), count.item(), aux["loss"].item(), float(aux["usage_fraction"]),
                              float(aux["perplexity"])], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        out = {"step": self.step, "caption_loss": float(stats[0] / stats[1].clamp_min(1)),
               "vq_loss": float(stats[2]) / self.world, "batch_usage": float(stats[3]) / self.world,
               "batch_perplexity": float(stats[4]) / self.world, "grad_norm": float(grad_norm),
               "lr": self.opt.param_groups[0]["lr"]}
        if cfg.reseed_every and self.step % cfg.reseed_every == 0 and (
                cfg.reseed_until is None or self.step <= cfg.reseed_until):
            out.update(self.reseed())
        return out

    def reseed(self) -> dict[str, float]:
        """Log the usage window, re-seed dead codes (collective), zero their optimizer moments."""
        quant = self.trainee.tok.quantizer
        window = quant.usage_stats()
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        dead = quant.reseed_dead_codes(self.cfg.reseed_min_count, generator=gen)
        state = self.opt.state.get(quant.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and dead.numel():
                state[key][dead] = 0
        self.log(f"[reseed] step {self.step}: window usage {window['usage_fraction']:.3f} "
                 f"perplexity {window['perplexity']:.1f}; re-seeded {dead.numel()} dead codes")
        return {"window_usage": window["usage_fraction"], "window_perplexity": window["perplexity"],
                "reseeded": float(dead.numel())}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        result: dict[str, Any] = {"warmup_losses": getattr(self, "warmup_losses", [])}
        if self.eval_set:
            result["eval_before"] = evaluate(self.trainee, self.llm, self.text_tok, self.eval_set, cfg)
            self._log_eval("before", result["eval_before"])
        self.ddp.train()
        while self.step < cfg.steps:
            stats = self.train_step()
            self.history.append(stats)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log(f"[tokenizer] step {self.step}/{cfg.steps} caption loss {stats['caption_loss']:.4f} "
                         f"vq {stats['vq_loss']:.4f} batch usage {stats['batch_usage']:.3f} "
                         f"ppl {stats['batch_perplexity']:.1f} lr {stats['lr']:.2e}")
                if self.tb is not None:
                    for k, v in stats.items():
                        if k != "step":
                            self.tb.add_scalar(f"tokenizer/{k}", v, self.step)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        if self.eval_set:
            result["eval_after"] = evaluate(self.trainee, self.llm, self.text_tok, self.eval_set, cfg)
            self._log_eval("after", result["eval_after"])
        if self.out_dir is not None:
            self.save_checkpoint()
            self.save_final()
        if self.tb is not None:
            self.tb.flush()
        result["history"] = self.history
        return result

    def _log_eval(self, when: str, ev: dict[str, float]) -> None:
        self.log(f"[eval {when}] caption loss {ev['loss']:.4f} (shuffled images {ev['loss_shuffled']:.4f}) "
                 f"codebook usage {ev['usage_fraction']:.3f} perplexity {ev['perplexity']:.1f}")
        if self.tb is not None:
            for k, v in ev.items():
                self.tb.add_scalar(f"eval/{k}", v, self.step)

    # ------------------------------------------------------------------ checkpoints
    def save_final(self) -> None:
        """out/tokenizer (save_pretrained), out/projector.safetensors, out/teacher (the frozen LLM)."""
        if self.rank == 0:
            self.trainee.tok.save_pretrained(self.out_dir / "tokenizer")
            save_file(_tensor_state(self.trainee.projector), str(self.out_dir / PROJECTOR_NAME))
            if not (self.out_dir / "teacher" / TEACHER_WEIGHTS).is_file():
                save_teacher(self.llm, self.out_dir / "teacher")
        if dist.is_initialized():
            dist.barrier()

    def save_checkpoint(self) -> Path:
        """Resumable state at out/checkpoints/step_N (written to .tmp, renamed, then latest.txt)."""
        root = self.out_dir / "checkpoints"
        final = root / f"step_{self.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
            self.trainee.tok.save_pretrained(tmp / "tokenizer")
            save_file(_tensor_state(self.trainee.projector), str(tmp / PROJECTOR_NAME))
            torch.save({"step": self.step, "optimizer": self.opt.state_dict(), "config": self.cfg.to_dict()},
                       tmp / "train_state.pt")
        if dist.is_initialized():
            dist.barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            (root / (LATEST + ".tmp")).write_text(final.name)
            os.replace(root / (LATEST + ".tmp"), root / LATEST)
            for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return final

    def _maybe_resume(self) -> None:
        latest = self.out_dir / "checkpoints" / LATEST
        if not latest.is_file():
            return
        path = self.out_dir / "checkpoints" / latest.read_text().strip()
        tok = self.trainee.tok
        state = load_file(str(path / "tokenizer" / "model.safetensors"))
        tok.load_state_dict(state, strict=True)
        proj = load_file(str(path / PROJECTOR_NAME))
        self.trainee.projector.load_state_dict(proj, strict=True)
        train_state = torch.load(path / "train_state.pt", weights_only=True)
        self.opt.load_state_dict(train_state["optimizer"])
        self.step = int(train_state["step"])
        rng_path = path / f"rng_rank{self.rank}.pt"
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
        self.log(f"resumed from {path} at step {self.step}")


def perplexity_summary(history: list[dict]) -> dict[str, float]:
    """Mean batch usage / perplexity of the first and last 10 % of a run's history."""
    k = max(1, len(history) // 10)
    head, tail = history[:k], history[-k:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"usage_start": mean(head, "batch_usage"), "usage_end": mean(tail, "batch_usage"),
            "perplexity_start": mean(head, "batch_perplexity"), "perplexity_end": mean(tail, "batch_perplexity"),
            "loss_start": mean(head, "caption_loss"), "loss_end": mean(tail, "caption_loss")}
