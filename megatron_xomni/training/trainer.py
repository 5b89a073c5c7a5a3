"""The pre-training / SFT loop on megatron-core.

One call, `train(cfg)`, runs a whole recipe: layout validation before any process group, model
(+ per-stage freezing), DDP + Megatron optimizer, LR schedule, data, resume, the loop with
NaN/Inf skipping, logging, atomic checkpoints and preemption (SIGTERM/SIGUSR1 -> save ->
exit code EXIT_REQUEUE, which the sbatch template turns into a requeue).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_xomni.training import faults
from megatron_xomni.training.config import RunConfig

EXIT_OK, EXIT_ERROR, EXIT_REQUEUE = 0, 1, 3


class TrainingError(RuntimeError):
    """A failure that stops the run with one clear line (exit code 1)."""


class InputError(TrainingError):
    """Bad input found when the run starts (a path, a checkpoint that does not fit): exit code 2."""


@dataclass
class TrainerState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


class PreemptionSignal:
    """Remembers SIGTERM/SIGUSR1; ranks agree on it after each step (a collective)."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def log0(msg: str) -> None:
    if not torch.distributed.is_initialized() or _rank0():
        print(msg, flush=True)


def resolve_dtype(precision: str) -> tuple[torch.dtype, dict]:
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision == "fp8" and not cuda:
        raise InputError("precision=fp8 needs a GPU with Transformer Engine: use bf16 or fp32 on CPU")
    if precision == "fp8":
        from megatron_xomni.models.xomni.layer_spec import transformer_engine_usable

        if not transformer_engine_usable():
            raise InputError("precision=fp8 needs Transformer Engine: pip install megatron-xomni[gpu]")
        return torch.bfloat16, {"fp8": "hybrid", "fp8_recipe": "delayed"}
    return (torch.bfloat16 if precision == "bf16" else torch.float32), {}


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
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.state = TrainerState()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_xomni.data.token_dataset import DatasetSpec, build_sample_streams
        from megatron_xomni.models.xomni.builder import build_model_chunks
        from megatron_xomni.models.xomni.layer_spec import transformer_engine_usable
        from megatron_xomni.parallel import initialize_parallel
        from megatron_xomni.training.metrics import MetricsLogger, Throughput
        from megatron_xomni.training.optim import wrap_and_build_optimizer

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # Everything that can be checked without process groups is checked first.
        cfg.validate(world, have_te_attention=transformer_engine_usable())
        dtype, precision_overrides = resolve_dtype(cfg.precision)
        if cfg.init_from and not Path(cfg.init_from).exists():
            raise InputError(f"init_from={cfg.init_from} does not exist: convert a checkpoint first")
        if not cfg.data.blend:
            raise InputError("data.blend is empty: point it at tokenized data (xomni tokenize / tools/tokenize_corpus.py)")
        self.resume_path, self.resume_changes = self._check_resume()

        self.pg = initialize_parallel(cfg.parallel, cfg.seed)
        self.world = world
        self.nmb = cfg.num_microbatches(world)
        self.chunks = build_model_chunks(cfg.model, cfg.parallel, self.pg, dtype, **precision_overrides)
        self.num_trainable = apply_trainable(self.chunks, cfg.trainable)
        self.wrapped, self.optimizer = wrap_and_build_optimizer(self.chunks, cfg.optim, self.pg)
        s = cfg.schedule
        decay = s.decay_steps or cfg.steps
        # The recipe's values always win over a resumed checkpoint's (training/resume.py): only the
        # step count comes from the checkpoint.
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if s.warmup_steps else cfg.optim.lr, max_lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr, lr_warmup_steps=s.warmup_steps, lr_decay_steps=decay,
            lr_decay_style=s.style, start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay,
            wd_incr_steps=decay, wd_incr_style="constant",
            wsd_decay_steps=s.wsd_decay_steps if s.style == "WSD" else None,
            lr_wsd_decay_style=s.wsd_decay_style if s.style == "WSD" else None,
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
        )
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
        self.logger = MetricsLogger(tb, str(Path(cfg.save_dir) / "metrics.jsonl"), enabled=_rank0())
        self.throughput = Throughput(cfg.model, cfg.data.seq_length, world, cfg.peak_tflops)
        self.preempt = PreemptionSignal()
        log0(f"[xomni] {cfg.name}: {cfg.parallel.describe(world)}, {self.nmb} micro-batches/step, "
             f"{self.num_trainable / 1e6:.2f}M trainable params on rank 0, dtype {dtype}")

    # ---- checkpoints -----------------------------------------------------------------------
    def _sharded_state(self, is_loading: bool = False) -> dict:
        from megatron_xomni.training.step import train_state_sharded_dict

        return train_state_sharded_dict(self.chunks, self.optimizer, is_loading=is_loading)

    def save(self) -> Path:
        from megatron.core import tensor_parallel

        from megatron_xomni.checkpointing import save_checkpoint

        t0 = time.perf_counter()
        st = self.state
        meta = {
            "run_config": self.cfg.to_dict(),
            "model_config": self.cfg.model.to_dict(),
            "trainer_state": {**st.__dict__, "scheduler": self.scheduler.state_dict(), "layout": self._layout()},
        }
        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }
        path = save_checkpoint(self.cfg.save_dir, st.iteration, self._sharded_state(), meta,
                               keep_last=self.cfg.keep_last, per_rank=rank_state,
                               before_publish=lambda: faults.fire("in_save", st.iteration, self.cfg.debug_kill))
        log0(f"[xomni] saved checkpoint {path} in {time.perf_counter() - t0:.2f}s")
        return path

    def _layout(self) -> dict:
        return {"world_size": self.world, **dataclasses.asdict(self.cfg.parallel)}

    def _check_resume(self):
        """(checkpoint to resume, applied setting changes); refuses a changed data plan. No process groups."""
        from megatron_xomni.checkpointing import latest_iteration, read_metadata, resolve_checkpoint
        from megatron_xomni.training.resume import check_resume, describe

        cfg = self.cfg
        if latest_iteration(cfg.save_dir) is None:
            return None, []
        path = resolve_checkpoint(cfg.save_dir)
        if read_metadata(path, "model_config") != cfg.model.to_dict():
            raise InputError(f"checkpoint {path} was saved with another model config: use a new save_dir")
        plan, applied = check_resume(read_metadata(path, "run_config"), cfg.to_dict(),
                                     cfg.data.allow_plan_change, str(path))
        if plan:
            log0(f"[xomni] resume: data plan changed (data.allow_plan_change=true): {describe(plan)}")
        return path, applied

    def _maybe_load(self) -> None:
        from megatron.core import tensor_parallel

        from megatron_xomni.checkpointing import load_checkpoint, load_rank_state, read_metadata, resolve_checkpoint
        from megatron_xomni.training.resume import describe
        from megatron_xomni.training.step import load_model_state, load_train_state, model_sharded_state_dict

        cfg = self.cfg
        if self.resume_path is not None:
            path = self.resume_path
            t0 = time.perf_counter()
            loaded = load_checkpoint(path, self._sharded_state(is_loading=True))
            load_train_state(self.chunks, self.optimizer, loaded)
            apply_optim_settings(self.optimizer, cfg.optim)
            ts = read_metadata(path, "trainer_state")
            self.scheduler.load_state_dict(ts.pop("scheduler"))
            layout = ts.pop("layout", None)
            self.state = TrainerState(**ts)
            rs = load_rank_state(path)
            if rs is not None and layout == self._layout():  # same layout: exact RNG continuation
                torch.set_rng_state(rs["torch_rng"])
                tensor_parallel.get_cuda_rng_tracker().set_states(rs["tracker"])
                if rs.get("cuda_rng") is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rs["cuda_rng"])
            log0(f"[xomni] resumed from {path} at iteration {self.state.iteration} "
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
            load_model_state(self.chunks, load_checkpoint(path, model_sharded_state_dict(self.chunks), partial=True))
            log0(f"[xomni] initialised model from {path}")

    # ---- loop ------------------------------------------------------------------------------
    def _step(self, batches: list[dict]) -> dict:
        from megatron_xomni.training.optim import zero_grads
        from megatron_xomni.training.step import forward_backward

        zero_grads(self.wrapped, self.optimizer)
        for w in self.wrapped:
            w.train()
        out = forward_backward(self.wrapped, batches, self.cfg.model.text_vocab_size, self.pg)
        if self.state.iteration + 1 in set(self.cfg.debug_inject_nonfinite_steps or []):
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
        cfg, st = self.cfg, self.state
        gbs = cfg.data.global_batch_size
        t_start, it_start = time.perf_counter(), st.iteration
        acc = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0, "n": 0}
        while st.iteration < cfg.steps:
            out = self._step(self.train_data.batch(st.consumed_samples))
            st.iteration += 1
            st.consumed_samples += gbs
            self.throughput.add(int(out["tokens"]))
            for k in ("loss", "text_loss", "image_loss"):
                if math.isfinite(out[k]):
                    acc[k] += out[k]
            acc["n"] += 1
            if st.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                self.save()
                raise TrainingError(
                    f"{st.consecutive_nonfinite} consecutive steps had a NaN/Inf loss or gradient "
                    f"(iteration {st.iteration}); checkpoint saved: lower optim.lr or check the data"
                )
            if st.iteration % cfg.log_interval == 0 or st.iteration == cfg.steps:
                self._log(out, acc, t_start, it_start)
                acc = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0, "n": 0}
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

    def _log(self, out: dict, acc: dict, t_start: float, it_start: int) -> None:
        from megatron_xomni.training.metrics import memory_gib

        cfg, st = self.cfg, self.state
        n = max(acc["n"], 1)
        tp = self.throughput.window()
        self.throughput.reset()
        done = st.iteration - it_start
        eta = (time.perf_counter() - t_start) / max(done, 1) * (cfg.steps - st.iteration)
        lr = self.optimizer.param_groups[0]["lr"]
        scalars = {
            "train/loss": acc["loss"] / n, "train/text_loss": acc["text_loss"] / n,
            "train/image_loss": acc["image_loss"] / n, "train/lr": lr,
            "train/grad_norm": float(out["grad_norm"]) if out["grad_norm"] is not None else float("nan"),
            "train/consumed_samples": st.consumed_samples, "train/skipped_steps": st.skipped_steps,
            "system/memory_gib": memory_gib(),
            **{k: v for k, v in tp.items() if not k.startswith("_")},
        }
        line = (f"iter {st.iteration:>6}/{cfg.steps} | loss {scalars['train/loss']:.4f} "
                f"(text {scalars['train/text_loss']:.3f}, image {scalars['train/image_loss']:.3f}) | "
                f"lr {lr:.2e} | gnorm {scalars['train/grad_norm']:.3f} | "
                f"{tp['throughput/tokens_per_s']:,.0f} tok/s ({tp['throughput/tokens_per_s_per_gpu']:,.0f}/gpu) | "
                f"{tp['throughput/tflops_per_gpu']:.3f} TFLOP/s/gpu, MFU {100 * tp['throughput/mfu']:.2f}% | "
                f"mem {scalars['system/memory_gib']:.2f} GiB | skipped {st.skipped_steps} | "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        self.logger.log(st.iteration, scalars, line)

    def _evaluate(self) -> None:
        from megatron_xomni.training.step import forward_backward

        for w in self.wrapped:
            w.eval()
        losses = []
        with torch.no_grad():
            for k in range(self.cfg.eval_iters):
                start = (self.state.iteration // self.cfg.eval_interval * self.cfg.eval_iters + k) * self.cfg.data.global_batch_size
                out = forward_backward(self.wrapped, self.valid_data.batch(start), self.cfg.model.text_vocab_size,
                                       self.pg, forward_only=True)
                losses.append(out["loss"])
        val = sum(losses) / len(losses)
        self.logger.log(self.state.iteration, {"valid/loss": val}, f"[xomni] validation loss {val:.4f}")

    def close(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()


def train(cfg: RunConfig) -> int:
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
