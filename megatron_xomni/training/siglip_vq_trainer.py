"""The SigLIP-VQ tokenizer trainer on the shared substrate (X-Omni section 1).

`train_siglip_vq(cfg)` runs a SiglipVQRunConfig (the RUNNER of `python -m megatron_xomni.train
tiny_siglip_vq ...`): config and paths checked before any process group; the teacher (warmed up once,
saved to <save_dir>/teacher, reused on resume); tokenizer + projector under torch DDP with AdamW and
megatron-core's LR scheduler (training/schedule.py); caption loss against the frozen teacher, dead-code
re-seeding, eval before/after; checkpoints through CheckpointManager with a DCP payload (model +
optimizer, each rank's RNG and quantizer usage buffers), one MetricsLogger, SIGTERM/SIGUSR1 -> save ->
exit 3, the `after_step`/`in_save` fault points; the export folder <save_dir>/export at the end.

Codebook health. Every `codebook.reseed_every` steps, codes chosen fewer than `reseed_min_count` times
during those steps (counts summed over all ranks) are re-seeded onto recent encoder features (rank 0's
choice broadcast) and the AdamW moments of their rows are zeroed so stale momentum does not drag them
back; `reseed_until` stops re-seeding late in training so the final codebook settles. The usage counts
and the feature ring buffer are per rank (DDP does not broadcast buffers); they are saved per rank, so
a resumed run re-seeds exactly as an uninterrupted one.

Data parallelism. The global batch `data.batch_size` is split over ranks by the corpus reader's
deterministic record/shard split, and the caption loss is normalised by the *global* number of text
targets, so K ranks compute exactly the gradient one rank computes on the whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_xomni.training.checkpoint import CheckpointManager, DCPPayload
from megatron_xomni.training.preemption import PreemptionSignal, end_of_step
from megatron_xomni.training.run import EXIT_OK, EXIT_REQUEUE, InputError, run_stage
from megatron_xomni.training.siglip_vq import (PROJECTOR_NAME, TEACHER_WEIGHTS, TokenizerWithProjector, _tensor_state,
                                               broadcast_module, build_llm, evaluate, lm_loss_sum, make_projector,
                                               save_teacher, warmup_llm)
from megatron_xomni.training.siglip_vq_aux import PixelHead, weighted_pixel_error
from megatron_xomni.training.siglip_vq_config import SiglipVQRunConfig

# Saved settings a resume must share (they define the model, the teacher and what each step reads).
FIXED_SECTIONS = ("tokenizer", "teacher", "data", "seed", "aux")
QUANT_BUFFERS = ("code_counts", "recent_features", "recent_filled", "recent_ptr")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def run_with_evals(trainer, log_fields: Callable[[dict], list[str]],
                   after_step: Optional[Callable[[dict, bool], None]] = None) -> int:
    """The run loop of the SigLIP stages: evaluate before (a fresh run), train to `steps` logging every
    `log_interval`, save + exit for requeue on a preemption signal, then evaluate after and export.

    `trainer` has cfg, step, eval_set, eval_before, ddp, logger, preempt and train_step(), save(),
    evaluate(when), export(eval_after); `after_step(out, logged)` runs after each step's logging.
    """
    cfg = trainer.cfg
    if trainer.step == 0 and trainer.eval_set:
        trainer.eval_before = trainer.evaluate("before")
    trainer.ddp.train()
    while trainer.step < cfg.steps:
        out = trainer.train_step()
        logged = trainer.step % cfg.log_interval == 0 or trainer.step == cfg.steps
        if logged:
            trainer.logger.log_step(trainer.step, out, log_fields(out))
        if after_step is not None:
            after_step(out, logged)
        if end_of_step(trainer.step, cfg, trainer.preempt, trainer.save):
            log0(f"[{cfg.name}] preemption signal received: saved at step {trainer.step}, exiting for requeue")
            return EXIT_REQUEUE
    trainer.export(trainer.evaluate("after") if trainer.eval_set else None)
    return EXIT_OK


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.endswith("overrides"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, now: dict, sections) -> list[str]:
    """Flattened keys of `sections` whose saved value differs from the current one (resume guard)."""
    old, new = _flat({k: saved.get(k) for k in sections}), _flat({k: now[k] for k in sections})
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def refuse_changed_settings(ckpt, cfg, sections, path: Path) -> None:
    """Refuse, in one line, a resume from `path` whose saved run config differs in `sections` (no process
    group needed)."""
    saved, now = ckpt.saved_run_config() or {}, cfg.to_dict()
    changed = changed_settings(saved, now, sections)
    if changed:
        k = changed[0]
        raise InputError(f"checkpoint {path} was trained with {k}={_flat(saved).get(k)!r}, not {_flat(now).get(k)!r} "
                         f"({len(changed)} such setting(s)): resume with the saved values or use a new save_dir")


def publish(out: Path, write: Callable[[Path], None], what: str) -> Path:
    """Rank 0 lets `write` fill <out>.tmp, then renames it to `out` (a present folder is a complete one);
    every rank waits for it."""
    if _rank0():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        log0(f"exported {out}: {what}")
    dist.barrier()
    return out


class SiglipVQTrainer:
    """One SigLIP-VQ run on this rank (see the module docstring)."""

    def __init__(self, cfg: SiglipVQRunConfig):
        self.cfg = cfg
        self.step = 0
        self.eval_before: dict | None = None
        self.warmup_losses: list[float] = []

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron_xomni.data import ImagePreprocessConfig
        from megatron_xomni.data.caption_batches import CaptionBatches
        from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
        from megatron_xomni.parallel import ParallelConfig, initialize_parallel, single_process_env
        from megatron_xomni.training.metrics import open_run_outputs
        from megatron_xomni.training.schedule import build_scheduler

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world)  # everything that can be checked without process groups comes first
        cfg.check_paths()
        self.ckpt = CheckpointManager(cfg.save_dir, cfg.keep_last, cfg.debug_kill, layout={"world_size": world})
        resume_path = self.ckpt.latest()
        if resume_path is not None:
            # Refuse a resume whose model, teacher or data settings differ.
            refuse_changed_settings(self.ckpt, self.cfg, FIXED_SECTIONS, resume_path)

        single_process_env()  # `python -m megatron_xomni.train tiny_siglip_vq` without torchrun: a world of one
        self.pg = initialize_parallel(ParallelConfig(), cfg.seed)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = _device()
        self.pp = ImagePreprocessConfig.tiny() if cfg.data.preprocess == "tiny" else ImagePreprocessConfig()
        self.text_tok = XOmniTextTokenizer.load(cfg.data.text_tokenizer)
        self.llm = self._teacher()
        self.text_tok.check_text_vocab(self.llm.model_cfg.text_vocab_size)
        self.llm.requires_grad_(False)
        self.llm.eval()

        # trainable tokenizer + projector (same init on every rank; DDP broadcasts rank 0's anyway)
        torch.manual_seed(cfg.seed)
        tok = self._tokenizer()
        projector = make_projector(cfg.tokenizer.projector, tok.cfg.adapter_dim, self.llm.config.hidden_size)
        head = PixelHead(tok.cfg.adapter_dim, tok.cfg.patch_size) if cfg.aux.pixel_weight > 0 else None
        self.trainee = TokenizerWithProjector(tok, projector, head).to(self.device)
        self.params = [p for p in self.trainee.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self._param_groups(), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                     eps=o.adam_eps, weight_decay=o.weight_decay)
        self.scheduler = build_scheduler(self.opt, cfg.schedule, o.lr, o.min_lr, o.weight_decay, cfg.steps)
        # broadcast_buffers=False: each rank keeps its own code-usage counts and feature ring buffer
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.trainee, broadcast_buffers=False, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if resume_path is not None:
            self._load(resume_path)
        else:  # quantizer randomness (skipped samples, ring-buffer picks) must differ between ranks
            torch.manual_seed(cfg.seed + 1000 * self.rank + 1)
        self.eval_set = self._eval_set()
        self.batches = CaptionBatches(cfg.data.corpus, cfg.data.batch_size // self.world, cfg.data.max_qa_pairs,
                                      preprocess_cfg=self.pp, seed=cfg.seed)
        self.batches.skip(self.step)
        self.logger = open_run_outputs(cfg, self.step, _rank0())
        self.preempt = PreemptionSignal()
        log0(f"[{cfg.name}] SigLIP-VQ: {self.world} rank(s) on {self.device}, global batch {cfg.data.batch_size}, "
             f"{sum(p.numel() for p in self.params) / 1e6:.2f}M trainable params, "
             f"teacher {sum(p.numel() for p in self.llm.parameters()) / 1e6:.1f}M (frozen)")

    def _param_groups(self) -> list[dict]:
        """One group, or two when aux.encoder_lr_mult != 1: the ViT's max/min lr scaled (the megatron-core
        scheduler reads per-group max_lr/min_lr)."""
        mult, o = self.cfg.aux.encoder_lr_mult, self.cfg.optim
        enc = {id(p) for p in self.trainee.tok.encoder.parameters()}
        enc_params = [p for p in self.params if id(p) in enc]
        if mult == 1.0 or not enc_params:
            return [{"params": self.params}]
        return [{"params": [p for p in self.params if id(p) not in enc]},
                {"params": enc_params, "max_lr": o.lr * mult, "min_lr": o.min_lr * mult}]

    def _teacher(self):
        """The frozen LLM: the warmed teacher of this run when saved, else built (and warmed up)."""
        from megatron_xomni.data.caption_batches import corpus_texts

        cfg = self.cfg
        teacher_dir = Path(cfg.save_dir) / "teacher"
        if (teacher_dir / TEACHER_WEIGHTS).is_file():
            llm = build_llm(dataclasses.replace(cfg.teacher, checkpoint=str(teacher_dir)), cfg.seed, self.pg)
            log0(f"[{cfg.name}] teacher loaded from {teacher_dir}")
            return llm.to(self.device)
        llm = build_llm(cfg.teacher, cfg.seed, self.pg).to(self.device)
        broadcast_module(llm)
        self.text_tok.check_text_vocab(llm.model_cfg.text_vocab_size)
        if cfg.teacher.warmup_steps > 0:
            torch.manual_seed(cfg.seed)
            texts = corpus_texts(cfg.data.corpus, cfg.teacher.warmup_records, cfg.data.max_qa_pairs, self.pp)
            self.warmup_losses = warmup_llm(llm, self.text_tok, texts, cfg.teacher, cfg.seed,
                                            cfg.data.max_text_tokens, log0)
            if self.rank == 0:
                save_teacher(llm, teacher_dir)
        return llm

    def _tokenizer(self):
        from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer

        t = self.cfg.tokenizer
        if t.init_from:
            tok = SiglipVQTokenizer.from_pretrained(t.init_from, **{**t.overrides, "freeze_encoder": t.freeze_encoder})
        else:
            tok = SiglipVQTokenizer(self.cfg.tokenizer_config())
        if t.siglip_path:
            tok.load_siglip_weights(t.siglip_path)
        return tok

    def _eval_set(self) -> list:
        from megatron_xomni.data.caption_batches import corpus_eval_set, world_eval_set

        e = self.cfg.eval
        items = world_eval_set(e.world_samples, e.image_size) if e.world_samples else []
        if e.corpus and e.corpus_samples:
            items += corpus_eval_set(e.corpus, e.corpus_samples, self.pp)
        return items

    # ---- checkpoints -----------------------------------------------------------------------
    def _rank_state(self) -> dict:
        quant = self.trainee.tok.quantizer
        return {"quantizer": {n: getattr(quant, n).detach().cpu().clone() for n in QUANT_BUFFERS}}

    def save(self) -> Path:
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "eval_before": self.eval_before,
                 "warmup_losses": self.warmup_losses}
        path = self.ckpt.save(self.step, DCPPayload(self.trainee, self.opt), self.cfg.to_dict(), state,
                              rank_state=self._rank_state())
        log0(f"[{self.cfg.name}] saved checkpoint {path}")
        return path

    def _load(self, path: Path) -> None:
        from megatron_xomni.checkpointing import load_rank_state

        _, resumed = self.ckpt.load(path, DCPPayload(self.trainee, self.opt))
        o = self.cfg.optim
        for g in self.opt.param_groups:  # the recipe's optimizer values win over the saved ones
            g["betas"], g["eps"] = (o.adam_beta1, o.adam_beta2), o.adam_eps
        ts = resumed.trainer_state
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step, self.eval_before = int(ts["step"]), ts.get("eval_before")
        self.warmup_losses = list(ts.get("warmup_losses") or [])
        rank_state = load_rank_state(path) if resumed.same_layout else None
        quant = self.trainee.tok.quantizer
        if rank_state is not None and "quantizer" in rank_state:
            for n in QUANT_BUFFERS:
                getattr(quant, n).copy_(rank_state["quantizer"][n])
        else:  # another world size: usage counts restart and the RNG streams are new ones
            quant.reset_usage()
            torch.manual_seed(self.cfg.seed + 1000 * self.rank + 1 + self.step)
        log0(f"[{self.cfg.name}] resumed from {path} at step {self.step}")

    # ---- one step --------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        pixels, texts = next(self.batches)
        ids, mask = self._encode(texts)
        embeds, aux = self.ddp(pixels.to(self.device))
        ce_sum, count = lm_loss_sum(self.llm, ids, mask, embeds)
        global_count = count.detach().clone()
        if self.world > 1:
            dist.all_reduce(global_count)
        # DDP averages gradients over ranks, so scale by world: the result is sum(CE) / global targets
        caption_loss = ce_sum / global_count.clamp_min(1) * self.world
        loss = caption_loss + cfg.codebook.aux_loss_weight * aux["loss"]
        pix_sum, pix_weight = torch.zeros(()), torch.zeros(())
        if "pixels" in aux:  # the tiny preset's pixel head (training/siglip_vq_aux.py)
            pix_sum, pix_weight = weighted_pixel_error(aux["pixels"], pixels.to(self.device),
                                                       self.trainee.tok.cfg.patch_size, cfg.aux.object_alpha)
            global_weight = pix_weight.detach().clone()
            if self.world > 1:
                dist.all_reduce(global_weight)
            # as for the caption loss: normalised by the global weight, so K ranks give one rank's gradient
            loss = loss + cfg.aux.pixel_weight * pix_sum / global_weight * self.world
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip > 0 else torch.tensor(0.0)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.scheduler.step(increment=1)
        self.step += 1
        stats = torch.tensor([ce_sum.item(), count.item(), aux["loss"].item(), float(aux["usage_fraction"]),
                              float(aux["perplexity"]), pix_sum.item(), pix_weight.item()], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        caption = float(stats[0] / stats[1].clamp_min(1))
        vq = float(stats[2]) / self.world
        pix = float(stats[5] / stats[6].clamp_min(1e-12))
        out = {"train/loss": caption + cfg.codebook.aux_loss_weight * vq + cfg.aux.pixel_weight * pix,
               "train/caption_loss": caption,
               "train/vq_loss": vq, "train/batch_usage": float(stats[3]) / self.world,
               "train/batch_perplexity": float(stats[4]) / self.world, "train/grad_norm": float(grad_norm),
               "train/lr": lr}
        if "pixels" in aux:
            out["train/pixel_loss"] = pix
        c = cfg.codebook
        if c.reseed_every and self.step % c.reseed_every == 0 and (c.reseed_until is None or self.step <= c.reseed_until):
            out.update(self.reseed())
        return out

    def _encode(self, texts: list[str]):
        from megatron_xomni.data.caption_batches import encode_texts

        ids, mask = encode_texts(self.text_tok, texts, self.cfg.data.max_text_tokens)
        return ids.to(self.device), mask.to(self.device)

    def reseed(self) -> dict[str, float]:
        """Re-seed dead codes (collective) and zero their optimizer moments; returns the window's stats."""
        quant = self.trainee.tok.quantizer
        window = quant.usage_stats()
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        dead = quant.reseed_dead_codes(self.cfg.codebook.reseed_min_count, generator=gen)
        state = self.opt.state.get(quant.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and dead.numel():
                state[key][dead.to(state[key].device)] = 0
        return {"codebook/window_usage": window["usage_fraction"], "codebook/window_perplexity": window["perplexity"],
                "codebook/reseeded": float(dead.numel())}

    # ---- loop ------------------------------------------------------------------------------
    def run(self) -> int:
        return run_with_evals(self, self._log_fields, self._after_step)

    @staticmethod
    def _log_fields(out: dict) -> list[str]:
        return [f"loss {out['train/loss']:.4f} (caption {out['train/caption_loss']:.4f}, vq {out['train/vq_loss']:.4f})",
                f"batch usage {out['train/batch_usage']:.3f} ppl {out['train/batch_perplexity']:.1f}",
                f"lr {out['train/lr']:.2e}", f"gnorm {out['train/grad_norm']:.3f}"]

    def _after_step(self, out: dict, logged: bool) -> None:
        """A step that re-seeded dead codes is logged (metrics and one line) even between log intervals."""
        if "codebook/reseeded" not in out:
            return
        if not logged:
            self.logger.log(self.step, out)
        log0(f"[{self.cfg.name}] reseed at step {self.step}: window usage {out['codebook/window_usage']:.3f} "
             f"perplexity {out['codebook/window_perplexity']:.1f}; re-seeded {out['codebook/reseeded']:.0f} "
             "dead codes")

    def evaluate(self, when: str) -> dict:
        d = self.cfg.data
        ev = evaluate(self.trainee, self.llm, self.text_tok, self.eval_set, d.max_qa_pairs, d.max_text_tokens,
                      self.cfg.eval.batch_size)
        self.logger.log(self.step, {f"eval/{k}": v for k, v in ev.items()},
                        f"[{self.cfg.name}] eval {when}: caption loss {ev['loss']:.4f} (shuffled images "
                        f"{ev['loss_shuffled']:.4f}), codebook usage {ev['usage_fraction']:.3f}, "
                        f"perplexity {ev['perplexity']:.1f}")
        return ev

    def export(self, eval_after: dict | None) -> Path:
        """<save_dir>/export: tokenizer/ (save_pretrained), projector.safetensors, summary.json; written to
        export.tmp and renamed, so a present export folder is a complete one."""
        def write(tmp: Path) -> None:
            self.trainee.tok.save_pretrained(tmp / "tokenizer")
            save_file({k: v.cpu() for k, v in _tensor_state(self.trainee.projector).items()}, str(tmp / PROJECTOR_NAME))
            summary = {"steps": self.step, "eval_before": self.eval_before, "eval_after": eval_after,
                       "teacher": str(Path(self.cfg.save_dir) / "teacher") if self.cfg.teacher.warmup_steps
                       else self.cfg.teacher.checkpoint,
                       "teacher_warmup_loss": [self.warmup_losses[0], self.warmup_losses[-1]] if self.warmup_losses else None}
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

        return publish(self.cfg.export_dir, write, f"tokenizer/ and {PROJECTOR_NAME}")

    def close(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()


def train_siglip_vq(cfg: SiglipVQRunConfig) -> int:
    """Run a SigLIP-VQ recipe; returns the exit code (0 done, 3 preempted and saved)."""
    return run_stage(SiglipVQTrainer(cfg))
