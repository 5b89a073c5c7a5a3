"""SigLIP pairwise-sigmoid contrastive pre-training of the tokenizer's ViT, on the shared substrate.

The stage before SigLIP-VQ training (issue 11, item 2): X-Omni quantizes a pretrained SigLIP2; the
tiny preset has none, so its ViT learns image-caption alignment here first, against a small text tower
on the corpus captions (models/siglip_vq/contrastive.py has the model and the loss). The full-size
path needs no such stage: `xomni_siglip_vq` loads a local SigLIP2 checkpoint (`tokenizer.siglip_path`).

    python -m megatron_xomni.train tiny_siglip_contrastive data.corpus=runs/tiny/corpus
    torchrun --nproc-per-node 2 -m megatron_xomni.train tiny_siglip_contrastive ...

Outputs under `save_dir`: `iter_N/` checkpoints (CheckpointManager + DCP of the model and AdamW),
`metrics.jsonl` + `tensorboard/`, and `export/tokenizer` (SiglipVQTokenizer.save_pretrained: the trained
encoder with a fresh quantizer and adapter; the VQ stage starts from it with `tokenizer.init_from`) plus
`export/summary.json` (held-out retrieval accuracy and loss before and after).

Data parallelism: every rank all-gathers the embeddings (autograd all_gather) and computes the loss of
the whole global batch; DDP's gradient average then equals one rank's gradient on that batch.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.distributed as dist

from megatron_xomni.dataclass_utils import check_numbers
from megatron_xomni.training.checkpoint import CheckpointManager, DCPPayload
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.preemption import PreemptionSignal
from megatron_xomni.training.run import InputError, RunSection, run_stage
from megatron_xomni.training.schedule import ScheduleConfig
from megatron_xomni.training.siglip_vq_trainer import (
    _device, _rank0, log0, publish, refuse_changed_settings, run_with_evals,
)

FIXED_SECTIONS = ("model", "data", "seed")


@dataclass
class ContrastiveModelSection:
    """The image tower (the tokenizer's ViT) and the small text tower."""

    preset: str = "tiny"
    """`tokenizer_config` preset of the tokenizer whose encoder trains."""
    overrides: dict = field(default_factory=dict)
    """SigLIPVQConfig fields overriding the preset (e.g. {"patch_size": 8, "pos_grid": 8})."""
    siglip_path: Optional[str] = None
    """Start the ViT from a local SigLIP/SigLIP2 vision checkpoint instead of random."""
    embed_dim: int = 64
    """Width of the shared image/text embedding space."""
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    init_scale: float = 10.0
    """exp(t) at the start (SigLIP: 10)."""
    init_bias: float = -10.0
    """b at the start (SigLIP: -10, so that the many negatives start with a small loss)."""


@dataclass
class ContrastiveDataSection:
    corpus: str = ""
    """Corpus folder (index.json + shard-*.tar)."""
    text_tokenizer: str = ""
    """Text tokenizer folder (its vocabulary sizes the text tower)."""
    batch_size: int = 128
    """Global batch: images per step over all ranks (the loss sees the whole global batch)."""
    preprocess: str = "tiny"
    """tiny (64 px world rules) | xomni."""
    max_text_tokens: int = 64
    """Caption tokens per sample (EOS included)."""


@dataclass
class ContrastiveEvalSection:
    world_samples: int = 0
    """Held-out world images for retrieval accuracy (image -> its caption among the set's captions)."""
    image_size: int = 64


@dataclass
class SiglipContrastiveRunConfig(RunSection):
    RUNNER: ClassVar[str] = "megatron_xomni.training.siglip_contrastive:train_siglip_contrastive"

    name: str = "siglip_contrastive"
    save_dir: str = "runs/siglip_contrastive"
    model: ContrastiveModelSection = field(default_factory=ContrastiveModelSection)
    data: ContrastiveDataSection = field(default_factory=ContrastiveDataSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=0.0, weight_decay=1e-4,
                                                                   adam_beta2=0.999, clip_grad=1.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(style="cosine", warmup_steps=50))
    eval: ContrastiveEvalSection = field(default_factory=ContrastiveEvalSection)

    @property
    def export_dir(self) -> Path:
        return Path(self.save_dir) / "export"

    def tokenizer_config(self):
        from megatron_xomni.models.siglip_vq.config import tokenizer_config

        return tokenizer_config(self.model.preset, **self.model.overrides)

    def validate(self, world_size: int) -> None:
        self.validate_run()
        self.optim.validate()
        if self.optim.use_distributed_optimizer or self.optim.overlap_grad_reduce:
            raise ValueError("optim.use_distributed_optimizer/overlap_grad_reduce are megatron-core settings; the "
                             "contrastive trainer runs torch AdamW under DDP: set them false")
        self.schedule.validate(self.steps)
        m, d = self.model, self.data
        check_numbers({"model.embed_dim": m.embed_dim, "model.text_width": m.text_width,
                       "model.text_layers": m.text_layers, "model.text_heads": m.text_heads,
                       "data.batch_size": d.batch_size, "data.max_text_tokens": d.max_text_tokens,
                       "eval.image_size": self.eval.image_size}, 1)
        check_numbers({"eval.world_samples": self.eval.world_samples}, 0)
        check_numbers({"model.init_scale": m.init_scale}, 0, integer=False)
        if m.text_width % m.text_heads:
            raise ValueError(f"model.text_width={m.text_width} is not divisible by model.text_heads={m.text_heads}")
        if d.batch_size % world_size:
            raise ValueError(f"data.batch_size={d.batch_size} is not a multiple of the {world_size} ranks: "
                             f"use a multiple of {world_size}")
        if d.preprocess not in ("tiny", "xomni"):
            raise ValueError(f"data.preprocess={d.preprocess!r}: use tiny or xomni")
        if not isinstance(m.overrides, dict):
            raise ValueError(f"model.overrides={m.overrides!r} is not a JSON object of SigLIPVQConfig fields")
        try:
            tcfg = self.tokenizer_config()
        except TypeError as err:
            raise ValueError(f"model.overrides: {err}") from None
        if tcfg.width % tcfg.num_heads:
            raise ValueError(f"encoder width {tcfg.width} is not divisible by its {tcfg.num_heads} heads")
        if not d.corpus:
            raise ValueError("data.corpus is empty: point it at a corpus folder (xomni corpus, or the built-in world "
                             "via megatron_xomni.data.write_world_corpus)")
        if not d.text_tokenizer:
            raise ValueError("data.text_tokenizer is empty: train one first (python -m megatron_xomni.train "
                             "tiny_text_tokenizer) and pass its save_dir")

    def check_paths(self) -> None:
        if not (Path(self.data.corpus) / "index.json").is_file():
            raise InputError(f"data.corpus={self.data.corpus} is not a corpus folder (no index.json): build one with "
                             "xomni corpus, or fix the path")
        if not Path(self.data.text_tokenizer).is_dir():
            raise InputError(f"data.text_tokenizer={self.data.text_tokenizer} is not a folder: train the text "
                             "tokenizer first")
        if self.model.siglip_path and not Path(self.model.siglip_path).exists():
            raise InputError(f"model.siglip_path={self.model.siglip_path} does not exist: download the SigLIP2 "
                             "checkpoint to a local folder and point at it")


def caption_ids(texts: list[str]) -> torch.Tensor:
    """A stable integer per caption text (equal texts, equal ids: positives of each other)."""
    return torch.tensor([zlib.crc32(t.encode()) for t in texts], dtype=torch.long)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, rank order; differentiable (the backward sums each rank's gradient back)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


class ContrastiveTrainer:
    def __init__(self, cfg: SiglipContrastiveRunConfig):
        self.cfg = cfg
        self.step = 0
        self.eval_before: dict | None = None

    def setup(self) -> None:
        from megatron_xomni.data import ImagePreprocessConfig
        from megatron_xomni.data.caption_batches import CaptionBatches
        from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
        from megatron_xomni.data.world_source import world_eval_set
        from megatron_xomni.models.siglip_vq.contrastive import SiglipContrastiveModel
        from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
        from megatron_xomni.parallel import ParallelConfig, initialize_parallel, single_process_env
        from megatron_xomni.training.metrics import open_run_outputs
        from megatron_xomni.training.schedule import build_scheduler

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world)
        cfg.check_paths()
        self.ckpt = CheckpointManager(cfg.save_dir, cfg.keep_last, cfg.debug_kill, layout={"world_size": world})
        resume = self.ckpt.latest()
        if resume is not None:
            refuse_changed_settings(self.ckpt, self.cfg, FIXED_SECTIONS, resume)
        single_process_env()
        self.pg = initialize_parallel(ParallelConfig(), cfg.seed)
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), _device()
        self.pp = ImagePreprocessConfig.tiny() if cfg.data.preprocess == "tiny" else ImagePreprocessConfig()
        self.text_tok = XOmniTextTokenizer.load(cfg.data.text_tokenizer)

        torch.manual_seed(cfg.seed)
        self.tok = SiglipVQTokenizer(cfg.tokenizer_config())
        if cfg.model.siglip_path:
            self.tok.load_siglip_weights(cfg.model.siglip_path)
        t, m = self.tok.cfg, cfg.model
        self.model = SiglipContrastiveModel(self.tok.encoder, t.width, t.num_heads, self.text_tok.vocab_size,
                                            m.text_width, m.text_layers, m.text_heads, m.embed_dim,
                                            cfg.data.max_text_tokens, m.init_scale, m.init_bias).to(self.device)
        self.params = list(self.model.parameters())
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                     weight_decay=o.weight_decay)
        self.scheduler = build_scheduler(self.opt, cfg.schedule, o.lr, o.min_lr, o.weight_decay, cfg.steps)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if resume is not None:
            self._load(resume)
        e = cfg.eval
        self.eval_set = world_eval_set(e.world_samples, e.image_size) if e.world_samples else []
        self.batches = CaptionBatches(cfg.data.corpus, cfg.data.batch_size // self.world, 0, preprocess_cfg=self.pp,
                                      seed=cfg.seed)
        self.batches.skip(self.step)
        self.logger = open_run_outputs(cfg, self.step, _rank0())
        self.preempt = PreemptionSignal()
        log0(f"[{cfg.name}] SigLIP contrastive: {self.world} rank(s), global batch {cfg.data.batch_size}, "
             f"{sum(p.numel() for p in self.params) / 1e6:.2f}M params (ViT {t.width}x{t.num_layers}, patch "
             f"{t.patch_size})")

    def save(self) -> Path:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "eval_before": self.eval_before}
        path = self.ckpt.save(self.step, DCPPayload(self.model, self.opt), self.cfg.to_dict(), state)
        log0(f"[{self.cfg.name}] saved checkpoint {path}")
        return path

    def _load(self, path: Path) -> None:
        _, resumed = self.ckpt.load(path, DCPPayload(self.model, self.opt))
        o = self.cfg.optim
        for g in self.opt.param_groups:
            g["betas"], g["eps"] = (o.adam_beta1, o.adam_beta2), o.adam_eps
        ts = resumed.trainer_state
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step, self.eval_before = int(ts["step"]), ts.get("eval_before")
        log0(f"[{self.cfg.name}] resumed from {path} at step {self.step}")

    def _encode(self, texts: list[str]):
        from megatron_xomni.data.caption_batches import encode_texts

        ids, mask = encode_texts(self.text_tok, texts, self.cfg.data.max_text_tokens)
        return ids.to(self.device), mask.to(self.device)

    def train_step(self) -> dict[str, float]:
        from megatron_xomni.models.siglip_vq.contrastive import sigmoid_contrastive_loss

        pixels, texts = next(self.batches)
        ids, mask = self._encode(texts)
        img, txt = self.ddp(pixels.to(self.device), ids, mask)
        img, txt = gather_rows(img), gather_rows(txt)
        cap = gather_rows(caption_ids(texts).to(self.device))
        loss = sigmoid_contrastive_loss(img, txt, self.model.log_scale, self.model.bias, cap[:, None] == cap[None, :])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.clip_grad
        gn = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip > 0 else torch.tensor(0.0)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {"train/loss": float(loss), "train/scale": float(self.model.log_scale.exp()),
                "train/bias": float(self.model.bias), "train/grad_norm": float(gn), "train/lr": lr}

    @torch.no_grad()
    def evaluate(self, when: str) -> dict:
        """Held-out image -> caption retrieval (top-1 among the set's distinct captions) and the loss."""
        from megatron_xomni.models.siglip_vq.contrastive import sigmoid_contrastive_loss

        self.model.eval()
        pixels = torch.stack([e[0] for e in self.eval_set]).to(self.device)
        texts = [e[1] for e in self.eval_set]
        img = torch.cat([self.model.embed_images(pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
        captions = sorted(set(texts))
        txt = self.model.embed_texts(*self._encode(captions))
        right = torch.tensor([captions.index(t) for t in texts], device=self.device)
        acc = float(((img @ txt.t()).argmax(1) == right).float().mean())
        cap = caption_ids(texts).to(self.device)
        per_text = self.model.embed_texts(*self._encode(texts))
        loss = float(sigmoid_contrastive_loss(img, per_text, self.model.log_scale, self.model.bias,
                                              cap[:, None] == cap[None, :]))
        self.model.train()
        out = {"retrieval_top1": acc, "loss": loss, "distinct_captions": len(captions)}
        self.logger.log(self.step, {f"eval/{k}": v for k, v in out.items()},
                        f"[{self.cfg.name}] eval {when}: retrieval top-1 {acc:.3f} over {len(captions)} captions, "
                        f"loss {loss:.4f}")
        return out

    def run(self) -> int:
        return run_with_evals(self, lambda out: [f"loss {out['train/loss']:.4f}", f"scale {out['train/scale']:.2f}",
                                                 f"bias {out['train/bias']:.2f}", f"lr {out['train/lr']:.2e}"])

    def export(self, eval_after: dict | None) -> Path:
        """<save_dir>/export/{tokenizer, summary.json}, written to export.tmp and renamed."""
        def write(tmp: Path) -> None:
            self.tok.save_pretrained(tmp / "tokenizer")
            summary = {"steps": self.step, "eval_before": self.eval_before, "eval_after": eval_after}
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

        return publish(self.cfg.export_dir, write, "tokenizer/ (trained ViT, fresh quantizer and adapter)")

    def close(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()


def train_siglip_contrastive(cfg: SiglipContrastiveRunConfig) -> int:
    """Run a contrastive recipe; returns the exit code (0 done, 3 preempted and saved)."""
    return run_stage(ContrastiveTrainer(cfg))
