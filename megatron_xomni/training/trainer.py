"""The pre-training / SFT trainer of the X-Omni AR model on megatron-core.

One call, `train(cfg)`, runs a whole recipe: layout validation and the resume rule before any
process group, model (+ per-stage freezing), DDP + Megatron optimizer, LR schedule, data, resume,
the loop with NaN/Inf skipping, validation (text and image loss), logging, checkpoints and
preemption. Checkpoints, metrics, preemption and the schedule are the shared substrate of every
trainer (training/checkpoint.py, metrics.py, preemption.py, schedule.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_xomni.device import resolve_precision, transformer_engine_usable
from megatron_xomni.training import faults
from megatron_xomni.training.checkpoint import CheckpointManager, MegatronPayload
from megatron_xomni.training.config import ARRunConfig
from megatron_xomni.training.preemption import PreemptionSignal
from megatron_xomni.training.run import EXIT_OK, EXIT_REQUEUE, InputError, TrainingError

@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


def _rank0() -> bool:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def log0(msg: str) -> None:
    if not torch.distributed.is_initialized() or _rank0():
        print(msg, flush=True)


def resolve_dtype(precision: str) -> tuple[torch.dtype, dict]:
    try:
        return resolve_precision(precision)
    except ValueError as e:  # this machine cannot run it: bad input for this job
        raise InputError(str(e)) from None


def apply_trainable(chunks: list, trainable: str) -> int:
    """Freeze per stage. 'vision' = X-Omni PT-1: vision blocks + image embedding/norm/head."""
    from megatron_xomni.models.xomni.layers import XOmniVisionLayer

    if trainable == "all":
        return sum(p.numel() for c in chunks for p in c.parameters())
    count = 0
    for chunk in chunks:
        keep = set()
        for name, module in chunk.named_modules():
            if isinstance(module, XOmniVisionLayer) or name in (
                "image_embedding", "image_output_layer", "decoder.final_layernorm.image_norm"):
                keep.update(id(p) for p in module.parameters())
        for p in chunk.parameters():
            p.requires_grad_(id(p) in keep)
            count += p.numel() if id(p) in keep else 0
    return count


class BatchSource:
    """Deterministic, resumable global batches: step i reads samples [i*G, (i+1)*G) of the sample
    stream (data.token_dataset.SampleStream); DP rank r takes a contiguous slice of each."""

    def __init__(self, dataset, micro_batch_size: int, num_microbatches: int, dp_rank: int, dp_size: int):
        self.ds, self.mbs, self.nmb, self.rank, self.dp = dataset, micro_batch_size, num_microbatches, dp_rank, dp_size

    def batch(self, consumed_samples: int) -> list[dict]:
        per_rank = self.mbs * self.nmb
        start = consumed_samples + self.rank * per_rank
        micro = []
        for m in range(self.nmb):
            items = [self.ds[start + m * self.mbs + j] for j in range(self.mbs)]
            # BlendedDataset adds a numpy "dataset_id"; only the tensors form the batch.
            micro.append({k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])})
        for mb in micro:
            if "attention_mask" in mb:  # [b, 1, s, s] True = masked, as megatron-core expects
                mb["attention_mask"] = mb["attention_mask"].bool()
        return micro


def apply_optim_settings(optimizer, optim) -> None:
    """Put the recipe's optimizer values into param groups loaded from a checkpoint: megatron-core keeps
    per-group max_lr/min_lr (which its scheduler prefers over its own), and Adam's betas/eps live there."""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for g in o.optimizer.param_groups:
            g["betas"], g["eps"] = (optim.adam_beta1, optim.adam_beta2), optim.adam_eps
            if "max_lr" in g:
                g["max_lr"], g["min_lr"] = optim.lr, optim.min_lr


def _grads_finite(wrapped: list) -> bool:
    bad = torch.zeros(1)
    for m in wrapped:
        for p in m.parameters():
            g = getattr(p, "main_grad", None)
            if g is not None and not torch.isfinite(g).all():
                bad.fill_(1.0)
                break
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


class Trainer:
    """AR pre-training / SFT on megatron-core over the shared substrate (see the module docstring)."""

    def __init__(self, cfg: ARRunConfig):
        self.cfg = cfg
        self.state = TrainerState()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron_xomni.data.token_dataset import DatasetSpec, build_sample_streams
        from megatron_xomni.models.xomni.builder import build_model_chunks
        from megatron_xomni.parallel import initialize_parallel
        from megatron_xomni.training.metrics import MetricsLogger, Throughput
        from megatron_xomni.training.optim import wrap_and_build_optimizer
        from megatron_xomni.training.schedule import build_scheduler

        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # Everything that can be checked without process groups is checked first.
        cfg.validate(self.world, have_te_attention=transformer_engine_usable())
        dtype, precision_overrides = resolve_dtype(cfg.precision)
        cfg.check_paths()
        self.ckpt = CheckpointManager(cfg.save_dir, cfg.keep_last, cfg.debug_kill,
                                      layout={"world_size": self.world, **dataclasses.asdict(cfg.parallel)})
        self.resume_path, self.resume_changes = self._check_resume()

        self.pg = initialize_parallel(cfg.parallel, cfg.seed)
        self.nmb = cfg.num_microbatches(self.world)
        self.chunks = build_model_chunks(cfg.model, cfg.parallel, self.pg, dtype, **precision_overrides)
        self.num_trainable = apply_trainable(self.chunks, cfg.trainable)
        self.wrapped, self.optimizer = wrap_and_build_optimizer(self.chunks, cfg.optim, self.pg)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.optim.lr, cfg.optim.min_lr,
                                         cfg.optim.weight_decay, cfg.steps)
        self._maybe_load()

        spec = DatasetSpec(blend=cfg.data.blend, seq_length=cfg.data.seq_length, eod_id=cfg.data.eod_id,
                           pad_id=cfg.data.pad_id, split=cfg.data.split, seed=cfg.seed,
                           pack_documents=cfg.data.pack_documents, cache_dir=cfg.data.cache_dir)
        try:
            train_ds, valid_ds = build_sample_streams(spec)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
        dp = self.pg.dp.size()
        self.train_data = BatchSource(train_ds, cfg.data.micro_batch_size, self.nmb, self.pg.dp.rank(), dp)
        self.valid_data = BatchSource(valid_ds, cfg.data.micro_batch_size, self.nmb, self.pg.dp.rank(), dp) if valid_ds else None

        tb = cfg.tensorboard_dir or str(Path(cfg.save_dir) / "tensorboard")
        self.logger = MetricsLogger(tb, str(Path(cfg.save_dir) / "metrics.jsonl"), enabled=_rank0(),
                                    name=cfg.name, total_steps=cfg.steps, start_step=self.state.iteration)
        self.throughput = Throughput(self.world, cfg.peak_tflops)
        self.preempt = PreemptionSignal()
        log0(f"[xomni] {cfg.name}: {cfg.parallel.describe(self.world)}, {self.nmb} micro-batches/step, "
             f"{self.num_trainable / 1e6:.2f}M trainable params on rank 0, dtype {dtype}")

    # ---- checkpoints -----------------------------------------------------------------------
    def _sharded_state(self, is_loading: bool = False) -> dict:
        from megatron_xomni.training.step import train_state_sharded_dict

        return train_state_sharded_dict(self.chunks, self.optimizer, is_loading=is_loading)

    def save(self) -> Path:
        t0 = time.perf_counter()
        st = self.state
        path = self.ckpt.save(st.iteration, MegatronPayload(self._sharded_state), self.cfg.to_dict(),
                              {**dataclasses.asdict(st), "scheduler": self.scheduler.state_dict()},
                              extra_metadata={"model_config": self.cfg.model.to_dict()})
        log0(f"[xomni] saved checkpoint {path} in {time.perf_counter() - t0:.2f}s")
        return path

    def _check_resume(self):
        """(checkpoint to resume, applied setting changes); refuses a changed data plan. No process groups."""
        from megatron_xomni.checkpointing import read_metadata
        from megatron_xomni.training.resume import check_resume, describe

        cfg = self.cfg
        path = self.ckpt.latest()
        if path is None:
            return None, []
        if read_metadata(path, "model_config") != cfg.model.to_dict():
            raise InputError(f"checkpoint {path} was saved with another model config: use a new save_dir")
        plan, applied = check_resume(read_metadata(path, "run_config"), cfg.to_dict(),
                                     cfg.data.allow_plan_change, str(path))
        if plan:
            log0(f"[xomni] resume: data plan changed (data.allow_plan_change=true): {describe(plan)}")
        return path, applied

    def _maybe_load(self) -> None:
        from megatron_xomni.checkpointing import read_metadata, resolve_checkpoint
        from megatron_xomni.models.xomni.checkpoint import load_weights
        from megatron_xomni.training.resume import describe
        from megatron_xomni.training.step import load_train_state

        cfg = self.cfg
        if self.resume_path is not None:
            t0 = time.perf_counter()
            loaded, resumed = self.ckpt.load(self.resume_path, MegatronPayload(self._sharded_state))
            load_train_state(self.chunks, self.optimizer, loaded)
            apply_optim_settings(self.optimizer, cfg.optim)
            ts = dict(resumed.trainer_state)
            self.scheduler.load_state_dict(ts.pop("scheduler"))
            self.state = TrainerState(**ts)
            log0(f"[xomni] resumed from {resumed.path} at iteration {self.state.iteration} "
                 f"({time.perf_counter() - t0:.2f}s)")
            if self.resume_changes:
                log0(f"[xomni] resume: applying changed settings: {describe(self.resume_changes)}")
        elif cfg.init_from:
            path = resolve_checkpoint(cfg.init_from)
            saved_model = read_metadata(path, "model_config")
            if saved_model is not None and saved_model != cfg.model.to_dict():
                raise InputError(
                    f"init_from {path} holds a different model config than the recipe: "
                    "set model.* overrides to match the checkpoint"
                )
            load_weights(self.chunks, path)
            log0(f"[xomni] initialised model from {path}")

    # ---- loop ------------------------------------------------------------------------------
    def _step(self, batches: list[dict]) -> dict:
        from megatron_xomni.training.optim import zero_grads
        from megatron_xomni.training.step import forward_backward

        zero_grads(self.wrapped, self.optimizer)
        for w in self.wrapped:
            w.train()
        out = forward_backward(self.wrapped, batches, self.cfg.model.text_vocab_size, self.pg)
        rank_hit = self.cfg.debug_inject_nonfinite_rank in (None, torch.distributed.get_rank())
        if self.state.iteration + 1 in set(self.cfg.debug_inject_nonfinite_steps or []) and rank_hit:
            for w in self.wrapped:  # testing aid: poison the gradients of this step
                for p in w.parameters():
                    if getattr(p, "main_grad", None) is not None:
                        p.main_grad.fill_(float("nan"))
                        break
        finite = math.isfinite(out["loss"]) and _grads_finite(self.wrapped)
        if finite:
            ok, grad_norm, _ = self.optimizer.step()
            finite = bool(ok) and grad_norm is not None and math.isfinite(grad_norm)
        else:
            grad_norm = float("nan")
        if finite:
            self.scheduler.step(increment=1)
            self.state.consecutive_nonfinite = 0
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_nonfinite += 1
        out["grad_norm"] = grad_norm
        out["finite"] = finite
        return out

    def run(self) -> int:
        from megatron_xomni.models.xomni.flops import model_flops_per_token

        cfg, st = self.cfg, self.state
        gbs, seq = cfg.data.global_batch_size, cfg.data.seq_length
        window = _LossWindow()
        while st.iteration < cfg.steps:
            out = self._step(self.train_data.batch(st.consumed_samples))
            st.iteration += 1
            st.consumed_samples += gbs
            image_share = out["image_tokens"] / max(out["tokens"], 1.0)
            self.throughput.add(gbs * seq, gbs * seq * model_flops_per_token(cfg.model, seq, image_share))
            window.add(out)
            if st.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                self.save()
                raise TrainingError(
                    f"{st.consecutive_nonfinite} consecutive steps had a NaN/Inf loss or gradient "
                    f"(iteration {st.iteration}); checkpoint saved: lower optim.lr or check the data"
                )
            if st.iteration % cfg.log_interval == 0 or st.iteration == cfg.steps:
                self._log(out, window)
                window = _LossWindow()
            if cfg.eval_interval and st.iteration % cfg.eval_interval == 0 and self.valid_data:
                self._evaluate()
            faults.fire("after_step", st.iteration, cfg.debug_kill)
            preempted = self.preempt.agreed()
            if preempted or st.iteration % cfg.save_interval == 0 or st.iteration == cfg.steps:
                self.save()
            if preempted:
                log0(f"[xomni] preemption signal received: saved at iteration {st.iteration}, exiting for requeue")
                return EXIT_REQUEUE
        return EXIT_OK

    def _log(self, out: dict, window: "_LossWindow") -> None:
        from megatron_xomni.training.metrics import memory_gib

        st = self.state
        tp = self.throughput.window()
        self.throughput.reset()
        lr = self.optimizer.param_groups[0]["lr"]
        losses = window.means()
        scalars = {
            "train/loss": losses["loss"], "train/text_loss": losses["text_loss"],
            "train/image_loss": losses["image_loss"], "train/lr": lr,
            "train/grad_norm": float(out["grad_norm"]) if out["grad_norm"] is not None else float("nan"),
            "train/consumed_samples": st.consumed_samples, "train/skipped_steps": st.skipped_steps,
            "train/window_skipped": window.skipped, "system/memory_gib": memory_gib(), **tp,
        }
        parts = [f"loss {losses['loss']:.4f} (text {losses['text_loss']:.3f}, image {losses['image_loss']:.3f})",
                 f"lr {lr:.2e}", f"gnorm {scalars['train/grad_norm']:.3f}",
                 f"{tp['throughput/tokens_per_s']:,.0f} tok/s ({tp['throughput/tokens_per_s_per_gpu']:,.0f}/gpu)",
                 f"{tp['throughput/tflops_per_gpu']:.3f} TFLOP/s/gpu, MFU {100 * tp['throughput/mfu']:.2f}%",
                 f"mem {scalars['system/memory_gib']:.2f} GiB",
                 f"skipped {window.skipped}/{window.steps} (total {st.skipped_steps})"]
        self.logger.log_step(st.iteration, scalars, parts)

    def _evaluate(self) -> None:
        """Validation loss over eval_iters global batches, split into text and image loss."""
        from megatron_xomni.training.step import forward_backward

        cfg = self.cfg
        for w in self.wrapped:
            w.eval()
        sums = {"t": 0.0, "tn": 0.0, "i": 0.0, "in": 0.0}
        with torch.no_grad():
            for k in range(cfg.eval_iters):
                start = (self.state.iteration // cfg.eval_interval * cfg.eval_iters + k) * cfg.data.global_batch_size
                out = forward_backward(self.wrapped, self.valid_data.batch(start), cfg.model.text_vocab_size,
                                       self.pg, forward_only=True)
                sums["t"] += out["text_loss_sum"]
                sums["tn"] += out["text_tokens"]
                sums["i"] += out["image_loss_sum"]
                sums["in"] += out["image_tokens"]
        nan = float("nan")
        scalars = {"valid/loss": (sums["t"] + sums["i"]) / max(sums["tn"] + sums["in"], 1.0),
                   "valid/text_loss": sums["t"] / sums["tn"] if sums["tn"] else nan,
                   "valid/image_loss": sums["i"] / sums["in"] if sums["in"] else nan,
                   "valid/tokens": sums["tn"] + sums["in"]}
        self.logger.log(self.state.iteration, scalars,
                        f"[{cfg.name}] validation loss {scalars['valid/loss']:.4f} "
                        f"(text {scalars['valid/text_loss']:.4f}, image {scalars['valid/image_loss']:.4f})")

    def close(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()


class _LossWindow:
    """Token-weighted mean losses over the finite steps of a logging window (NaN when every step was
    skipped), and how many steps were skipped."""

    def __init__(self):
        self.steps = self.skipped = 0
        self.sums = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        self.tokens = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}

    def add(self, out: dict) -> None:
        self.steps += 1
        if not out["finite"]:
            self.skipped += 1
            return
        for key, n in (("text_loss", out["text_tokens"]), ("image_loss", out["image_tokens"])):
            if n:
                self.sums[key] += out[key] * n
                self.tokens[key] += n
        self.sums["loss"] += out["loss"] * out["tokens"]
        self.tokens["loss"] += out["tokens"]

    def means(self) -> dict:
        return {k: self.sums[k] / self.tokens[k] if self.tokens[k] else float("nan") for k in self.sums}


def train(cfg: ARRunConfig) -> int:
    """Run a recipe; returns the process exit code (0 done, 3 requeue, 1 error)."""
    from megatron_xomni.parallel import destroy_parallel

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if _rank0():
            Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.save_dir) / "run_config.json").write_text(cfg.to_json())
            log0(cfg.to_json())
        return trainer.run()
    finally:
        trainer.close()
        destroy_parallel()
