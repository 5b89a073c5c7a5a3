"""The GRPO run: rollouts in the training layout -> frozen decoder -> rewards -> GRPO update.

Each step: this data-parallel replica takes its share of the step's prompts (rows of the configured
prompt source - a .jsonl/.txt file, a benchmark file or the built-in world's training stream -
addressed by global index so the prompt position resumes exactly), samples G image
token sequences per prompt with the policy in its training TP/PP layout (KV cache), renders them
with the frozen tokenizer + diffusion decoder (one decoder seed per group by default, optionally
several decodes averaged: rl/decoder_noise.py), scores them with the reward ensemble, each TP/PP
peer decoding and scoring only its share (rl/scoring.py; each reward
reads the prompt row's fields it declares; a row lacking one is a counted failure) and applies
the GRPO objective (clipped ratios, k3 KL to a frozen reference held in the same layout).
Checkpoints hold policy, optimizer, step and RNG; the reference is re-read from `init_from`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from megatron_xomni.data.prompts import PromptConfig
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.parallel.layout import ParallelConfig
from megatron_xomni.rl.decoder_noise import averaged_rewards
from megatron_xomni.rl.grpo import GRPOConfig
from megatron_xomni.rl.scoring import decode_and_score
from megatron_xomni.data.image_grid import ImageGrid
from megatron_xomni.inference.decode import DecodeEngine
from megatron_xomni.training import faults
from megatron_xomni.training.checkpoint import CheckpointManager, MegatronPayload
from megatron_xomni.training.preemption import EXIT_REQUEUE, PreemptionSignal
from megatron_xomni.training.run import RunSection, run_stage
from megatron_xomni.inference.sampling import SamplingConfig
from megatron_xomni.training.optim import OptimConfig


@dataclass
class GRPORunConfig(RunSection):
    """An RL run (X-Omni section 5). The run section's fields come first (training/run.py)."""

    RUNNER: ClassVar[str] = "megatron_xomni.rl.trainer:train_grpo"

    name: str = "grpo"
    steps: int = 200
    """GRPO steps."""
    save_dir: str = "runs/grpo"
    save_interval: int = 20
    keep_last: Optional[int] = 2
    log_interval: int = 1
    model: XOmniModelConfig = field(default_factory=XOmniModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0, clip_grad=1.0))
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(kl_beta=0.01, loss_aggregation="sequence"))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, min_p=0.03))
    group_size: int = 16
    """G: samples per prompt."""
    decode_steps: str = "dynamic"
    """How rollout decode steps run (RolloutConfig.decode_steps): "dynamic", "static", or
    "cuda_graph" (GPU, PP=1: one CUDA graph per generation batch, replayed every step)."""
    prompts_per_step: int = 32
    """Prompts per step over all replicas (X-Omni's "batch 512" read as 32 prompts x G=16)."""
    image_height: int = 384
    """Pixels (multiple of 16)."""
    image_width: int = 384
    init_from: str = "runs/sft"
    """Policy initialisation and frozen reference (an SFT checkpoint root)."""
    text_tokenizer: str = "tokenizers/text"
    image_tokenizer: str = "tokenizers/image"
    decoder: str = "decoders/xomni"
    decoder_steps: int = 28
    """Euler steps of the frozen decoder."""
    decoder_batch_size: int = 16
    """Images per decoder call (bounds its memory); also the unit of decoding and scoring work shared
    among the TP/PP peers of a replica (rl/scoring.py)."""
    shared_decoder_seed: bool = True
    """Decode the G samples of a group with one decoder seed (common random numbers), so decoder
    noise does not enter the advantage (rl/decoder_noise.py); False: one seed per sample."""
    reward_decodes: int = 1
    """Decodes per rollout whose rewards are averaged (K; each costs one more decoder pass)."""
    rewards: dict = field(default_factory=lambda: {"world_alignment": 1.0, "ocr_text": 1.0})
    """Reward ensemble weights (name -> weight), rewards by their registered names."""
    reward_args: dict = field(default_factory=dict)
    """Factory arguments per reward (name -> kwargs), e.g. {"hpsv2": {"model_dir": "ckpt/hpsv2"}}."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """Where prompts come from: a .jsonl/.txt prompt file, a benchmark file or the built-in world's
    training stream (data/prompts.py)."""
    log_images: int = 8
    """Sample images written to TensorBoard per log step (rank 0)."""

    def validate(self, world_size: int) -> None:
        """Layout and types: what submit and --dry-run check (no file is read; see check_paths)."""
        from megatron_xomni.dataclass_utils import check_numbers

        self.validate_run()
        self.optim.validate()
        check_numbers({"group_size": self.group_size, "prompts_per_step": self.prompts_per_step,
                       "decoder_steps": self.decoder_steps, "reward_decodes": self.reward_decodes,
                       "decoder_batch_size": self.decoder_batch_size, "image_height": self.image_height,
                       "image_width": self.image_width}, 1)
        dp = self.parallel.data_parallel(world_size)
        if self.prompts_per_step % dp:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} is not divisible by DP={dp}: change it")
        local = self.prompts_per_step // dp * self.group_size // self.grpo.num_minibatches
        if local % self.grpo.micro_batch_size:
            raise ValueError(f"{local} rollouts per replica and minibatch are not a multiple of "
                             f"grpo.micro_batch_size={self.grpo.micro_batch_size}: set it to a divisor (e.g. group_size)")
        self.parallel.validate_for(self.model, world_size, decoding=True)
        if self.decode_steps not in DecodeEngine.STEPS:
            raise ValueError(f"decode_steps={self.decode_steps!r}: expected one of {', '.join(DecodeEngine.STEPS)}")
        if self.decode_steps != "dynamic" and (self.parallel.pipeline_parallel > 1
                                               or (self.parallel.virtual_pipeline_parallel or 1) > 1):
            raise ValueError(f"decode_steps={self.decode_steps!r} runs one pipeline stage and one model chunk: "
                             f"set decode_steps='dynamic' with pipeline parallelism")
        self.prompts.validate()
        self._check_rewards()

    def _check_rewards(self) -> None:
        from megatron_xomni.rewards import check_reward

        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ValueError('rewards must map reward names to weights, e.g. rewards={"ocr_text": 1.0}')
        if not isinstance(self.reward_args, dict) or not all(isinstance(v, dict) for v in self.reward_args.values()):
            raise ValueError('reward_args must map reward names to factory arguments, e.g. {"hpsv2": {"model_dir": "..."}}')
        extra = sorted(set(self.reward_args) - set(self.rewards))
        if extra:
            raise ValueError(f"reward_args given for {', '.join(extra)}, which rewards does not weight: add a weight or drop them")
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"rewards.{name}={weight!r}: weights are positive numbers (drop a reward instead of weight 0)")
            check_reward(name, **self.reward_args.get(name, {}))

    def check_paths(self):
        """The local inputs, checked when the job starts, before any process group or model load:
        checkpoints, tokenizers, decoder, reward model folders and the prompt source, which must give
        every configured reward the fields it reads in at least one row. Returns the prompt source."""
        from megatron_xomni.data.prompts import check_fields, make_prompt_source
        from megatron_xomni.models.siglip_vq.model import check_pretrained
        from megatron_xomni.rewards import check_reward_inputs, required_fields

        for name in ("init_from", "text_tokenizer", "image_tokenizer", "decoder"):
            if not Path(getattr(self, name)).exists():
                raise ValueError(f"{name}={getattr(self, name)} does not exist: "
                                 + ("train SFT first or fix the path" if name == "init_from" else "fix the path"))
        patch = check_pretrained(self.image_tokenizer).patch_size  # its config only, no weights
        ImageGrid.from_pixels(self.image_height, self.image_width, patch, what="image_height x image_width")
        for name in self.rewards:
            check_reward_inputs(name, **self.reward_args.get(name, {}))
        source = make_prompt_source(self.prompts, self.image_height, self.image_width)
        check_fields(source, {n: required_fields(n, **self.reward_args.get(n, {})) for n in self.rewards})
        return source


class GRPOTrainer:
    def __init__(self, cfg: GRPORunConfig):
        self.cfg = cfg
        self.step = 0

    def setup(self) -> None:
        import os

        from megatron_xomni.checkpointing import resolve_checkpoint
        from megatron_xomni.models.xomni.checkpoint import load_xomni
        from megatron_xomni.parallel import initialize_parallel
        from megatron_xomni.rewards import RewardEnsemble
        from megatron_xomni.rl.grpo import GRPOStep
        from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
        from megatron_xomni.training.metrics import open_run_outputs
        from megatron_xomni.training.optim import wrap_and_build_optimizer

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg.validate(world)
        # Every rank reads the prompt source (rows are addressed by global index); a bad input stops all
        # of them here, before any process group, and rank 0 prints the one line (train.py).
        self.prompts = cfg.check_paths()
        self.ckpt = CheckpointManager(cfg.save_dir, cfg.keep_last, cfg.debug_kill,
                                      layout={"world_size": world, **dataclasses.asdict(cfg.parallel)})
        self.pg = initialize_parallel(cfg.parallel, cfg.seed)
        self.text_tok = XOmniTextTokenizer.load(cfg.text_tokenizer)
        self.text_tok.check_text_vocab(cfg.model.text_vocab_size)
        init = resolve_checkpoint(cfg.init_from)
        self.chunks, _ = load_xomni(init, cfg.parallel, self.pg, model_config=cfg.model)
        self.ref = None
        if cfg.grpo.kl_beta > 0:  # the frozen reference, in the same layout
            self.ref, _ = load_xomni(init, cfg.parallel, self.pg, model_config=cfg.model)
            for m in self.ref:
                m.eval().requires_grad_(False)
        self.wrapped, self.optimizer = wrap_and_build_optimizer(self.chunks, cfg.optim, self.pg)
        self.grpo = GRPOStep(self.wrapped, self.optimizer, self.pg, cfg.grpo, self.ref)
        from megatron_xomni.inference.render import Renderer

        self.renderer = Renderer(cfg.image_tokenizer, cfg.decoder, cfg.decoder_steps, batch_size=cfg.decoder_batch_size)
        self.rewards = RewardEnsemble(dict(cfg.rewards), **{n: dict(kw) for n, kw in cfg.reward_args.items()})
        self.reference_identity = str(init)
        self._maybe_resume()
        self.logger = open_run_outputs(cfg, self.step, torch.distributed.get_rank() == 0)

    # ---- checkpoints -------------------------------------------------------------------------
    def _sharded(self, is_loading=False) -> dict:
        from megatron_xomni.training.step import train_state_sharded_dict

        return train_state_sharded_dict(self.chunks, self.optimizer, is_loading=is_loading)

    def save(self) -> None:
        self.ckpt.save(self.step, MegatronPayload(self._sharded), self.cfg.to_dict(),
                       {"step": self.step, "reference": self.reference_identity},
                       extra_metadata={"model_config": self.cfg.model.to_dict()})

    def _maybe_resume(self) -> None:
        from megatron_xomni.checkpointing import read_metadata
        from megatron_xomni.training.step import load_train_state

        path = self.ckpt.latest()
        if path is None:
            return
        state = read_metadata(path, "trainer_state")
        if state["reference"] != self.reference_identity:
            raise ValueError(f"{path} was trained against reference {state['reference']}, not {self.reference_identity}: "
                             "resume with that init_from, or use a new save_dir")
        loaded, resumed = self.ckpt.load(path, MegatronPayload(self._sharded))
        load_train_state(self.chunks, self.optimizer, loaded)
        self.step = resumed.trainer_state["step"]
        if torch.distributed.get_rank() == 0:
            print(f"[grpo] resumed from {path} at step {self.step}", flush=True)

    # ---- one step ----------------------------------------------------------------------------
    def prompts_for_step(self, step: int):
        """(global prompt indices, prompt rows) of this replica for `step` (contiguous block per replica)."""
        cfg = self.cfg
        dp, rank = self.pg.dp.size(), self.pg.dp.rank()
        per = cfg.prompts_per_step // dp
        ids = [step * cfg.prompts_per_step + rank * per + i for i in range(per)]
        return ids, self.prompts.rows(ids)

    def rollout(self, step: int):
        from megatron_xomni.inference.generation import RolloutConfig, generate_images
        from megatron_xomni.data.sequence import SequenceFormat, image_block_ids

        cfg = self.cfg
        h, w = ImageGrid.from_pixels(cfg.image_height, cfg.image_width, self.renderer.patch,
                                     what="image_height x image_width").shape
        ids, rows = self.prompts_for_step(step)
        fmt = SequenceFormat(cfg.model.text_vocab_size, cfg.model.image_vocab_size)
        header, _, eom = image_block_ids(self.text_tok, fmt, torch.zeros(h, w, dtype=torch.long).numpy())
        prompts = [self.text_tok.encode(r["prompt"]) + header for r in rows]
        local_ids = [i - step * cfg.prompts_per_step for i in ids]  # ids within the step, global over DP
        rcfg = RolloutConfig(sampling=cfg.sampling, samples_per_prompt=cfg.group_size, seed=cfg.seed * 100_003 + step,
                             decode_steps=cfg.decode_steps)
        rollouts = generate_images(self.chunks, self.pg, prompts, (h, w), eom, rcfg, prompt_ids=local_ids)
        return rollouts, rows, (h, w)

    def run_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        rollouts, rows, (h, w) = self.rollout(self.step)
        t_rollout = time.perf_counter() - t0
        first = min(r.prompt_id for r in rollouts)
        t0 = time.perf_counter()
        codes = torch.stack([r.codes.view(h, w) for r in rollouts])
        metas = [rows[r.prompt_id - first] for r in rollouts]
        captions = [m["prompt"] for m in metas]

        def decode_score(seeds):
            # Each TP/PP peer of this replica decodes and scores its share; the rewards are gathered.
            rendered, res = decode_and_score(self.renderer, self.rewards, codes, seeds, captions, metas, self.pg.mp)
            return [0.0 if v is None else float(v) for v in res.total], res, [rendered[i] for i in sorted(rendered)]

        rew, results, images = averaged_rewards(
            decode_score, [r.prompt_id for r in rollouts], [r.sample_id for r in rollouts],
            cfg.seed, self.step, cfg.shared_decoder_seed, cfg.reward_decodes)
        rewards = rew.tolist()
        t_decode = time.perf_counter() - t0  # decode + reward of this rank's share, and the gathers
        for m in self.wrapped:
            m.train()
        stats = self.grpo(rollouts, rewards)
        self.step += 1
        rew = torch.tensor(rewards)
        # rewards are per replica: gather global statistics over DP. Per reward: the sum and count of its
        # values, its failures and, of those, the rows lacking a field it reads (over all decodes).
        names = list(results[0].components)
        per = []
        for n in names:
            vals = [x for res in results for x in res.components[n] if x is not None]
            per += [sum(vals), float(len(vals)), float(sum(len(res.failures.get(n, [])) for res in results)),
                    float(sum(res.missing_fields.get(n, 0) for res in results))]
        sums = torch.tensor([rew.sum().item(), float(len(rew)), *per])
        torch.distributed.all_reduce(sums, group=self.pg.dp)
        mx = torch.tensor([rew.max().item(), -rew.min().item()])
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX, group=self.pg.dp)
        comps = {}
        for k, n in enumerate(names):
            total, count, failed, missing = sums[2 + 4 * k: 6 + 4 * k].tolist()
            comps[f"reward/{n}"] = total / count if count else float("nan")
            comps[f"reward/{n}_failures"], comps[f"reward/{n}_missing_fields"] = failed, missing
        n_tokens = sum(r.num_sampled for r in rollouts)
        times = stats.get("time", {})
        out = {
            "reward/mean": (sums[0] / sums[1]).item(), "reward/max": mx[0].item(), "reward/min": -mx[1].item(),
            **comps, "reward/failures": sum(comps[f"reward/{n}_failures"] for n in names),
            "grpo/loss": stats["loss"], "grpo/kl": stats["kl"], "grpo/clip_fraction": stats["clip_fraction"],
            "grpo/entropy": stats["entropy"], "grpo/response_length": stats["response_length"],
            "grpo/dropped_group_share": stats["dropped_group_share"], "grpo/dropped_groups": stats["dropped_groups"],
            "grpo/skipped_updates": stats["skipped_updates"], "grpo/padded_token_share": stats["padded_token_share"],
            "time/rollout": t_rollout, "time/decode_and_reward": t_decode,
            "time/logprob": times.get("reference", 0.0) + times.get("prepare", 0.0), "time/update": times.get("update", 0.0),
            "perf/rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
        }
        self._images = images[: cfg.log_images]
        return out

    def run(self) -> int:
        cfg = self.cfg
        preempt = PreemptionSignal()
        while self.step < cfg.steps:
            out = self.run_step()
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                self.logger.log_step(self.step, out, [
                    f"reward {out['reward/mean']:.3f} (min {out['reward/min']:.2f}, max {out['reward/max']:.2f})",
                    f"kl {out['grpo/kl']:.4f}", f"clip {out['grpo/clip_fraction']:.3f}",
                    f"entropy {out['grpo/entropy']:.3f}", f"dropped {out['grpo/dropped_group_share']:.0%} of groups",
                    f"rollout {out['time/rollout']:.1f}s decode+reward {out['time/decode_and_reward']:.1f}s "
                    f"update {out['time/update']:.1f}s",
                    f"{out['perf/rollout_tokens_per_s']:.0f} rollout tok/s"])
                if self.logger.writer is not None and self._images:
                    import numpy as np

                    grid = np.concatenate([np.asarray(im) for im in self._images], axis=1)
                    self.logger.writer.add_image("samples", grid, self.step, dataformats="HWC")
            faults.fire("after_step", self.step, cfg.debug_kill)
            preempted = preempt.agreed()
            if preempted or self.step % cfg.save_interval == 0 or self.step == cfg.steps:
                self.save()
            if preempted:
                if torch.distributed.get_rank() == 0:
                    print(f"[grpo] preemption signal: saved at step {self.step}, exiting for requeue", flush=True)
                return EXIT_REQUEUE
        return 0

    def close(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()


def train_grpo(cfg: GRPORunConfig) -> int:
    return run_stage(GRPOTrainer(cfg))
