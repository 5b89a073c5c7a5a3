"""The resolved configuration of one training run, composed of typed sections.

Recipes (top-level `recipes/`) are small Python functions returning a `RunConfig`; they derive
from each other. `key=value` overrides address fields by dotted path (`optim.lr=1e-5`,
`parallel.tensor_parallel=2`, `model.num_layers=4`). The fully resolved config is printed at
start and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from megatron_xomni.dataclass_utils import apply_overrides, check_numbers  # noqa: F401  (apply_overrides re-exported)
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.parallel.layout import ParallelConfig
from megatron_xomni.training.optim import OptimConfig


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (megatron-core's OptimizerParamScheduler)."""

    style: str = "constant"
    """constant | cosine | linear | WSD (warmup-stable-decay, for annealing)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_steps: Optional[int] = None
    """Steps over which the LR decays (default: steps)."""
    wsd_decay_steps: int = 0
    """WSD only: length of the final decay phase."""
    wsd_decay_style: str = "linear"
    """WSD only: shape of the final decay (linear | cosine | exponential | minus_sqrt)."""


@dataclass
class DataConfig:
    """Token data (files written by tools/tokenize_corpus.py) and batch shape."""

    blend: list = field(default_factory=list)
    """Token file prefixes, optionally weighted: [w1, prefix1, w2, prefix2, ...]."""
    seq_length: int = 16384
    """Tokens per sample."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 256
    """Samples per optimizer step across all data-parallel ranks."""
    eod_id: int = 0
    """End-of-document token id (the text tokenizer's EOS)."""
    pad_id: int = -1
    """Padding id inside megatron-core's sample builder (never a real token)."""
    split: str = "98,2,0"
    """train,valid,test split of documents (percent)."""
    pack_documents: bool = False
    """SFT packing: positions restart and attention stays inside each document."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches its sample indices (default: beside the data)."""
    allow_plan_change: bool = False
    """Resume even though blend, seq_length, split, packing, ids, seed or global batch changed
    (otherwise refused: they change which samples every step reads; see training/resume.py)."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    name: str = "run"
    """Run name (logs, SLURM job name)."""
    model: XOmniModelConfig = field(default_factory=XOmniModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed of initialisation, data order and dropout."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8 (Transformer Engine, GPU)."""
    trainable: str = "all"
    """all | vision (X-Omni PT-1: vision blocks + image embedding/norm/head only)."""
    save_dir: str = "runs/run"
    """Checkpoint root of this run (resumes from it automatically)."""
    init_from: Optional[str] = None
    """Checkpoint root to initialise the model from (e.g. a converted Qwen2.5), model only."""
    save_interval: int = 500
    """Steps between checkpoints (one is always written at the end and on preemption)."""
    keep_last: Optional[int] = 3
    """Checkpoints kept (None keeps all)."""
    log_interval: int = 10
    """Steps between console/TensorBoard logs."""
    eval_interval: int = 0
    """Steps between validation runs (0: never)."""
    eval_iters: int = 2
    """Validation micro-batch groups per evaluation."""
    tensorboard_dir: Optional[str] = None
    """Default: <save_dir>/tensorboard."""
    peak_tflops: float = 989.0
    """Per-device dense peak for MFU (H100/H200 bf16: 989)."""
    max_consecutive_nonfinite: int = 5
    """Stop (after a checkpoint) when this many steps in a row have a NaN/Inf loss or gradient."""
    debug_inject_nonfinite_steps: list = field(default_factory=list)
    """Testing aid: poison the gradients at these (1-based) steps to exercise NaN skipping."""
    debug_kill: str = ""
    """Testing aid: SIGKILL this process at POINT:STEP[@RANK] (training/faults.py), e.g. in_save:4."""

    # ---- derived & validation ----------------------------------------------------------
    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel(world_size)
        per_step = self.data.micro_batch_size * dp
        if self.data.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.data.global_batch_size} is not divisible by "
                f"micro_batch_size*DP={self.data.micro_batch_size}*{dp}: change data.global_batch_size"
            )
        return self.data.global_batch_size // per_step

    def validate(self, world_size: int, have_te_attention: bool = False) -> None:
        """One-line ValueError naming the fix for any inconsistent setting."""
        check_numbers({"steps": self.steps, "save_interval": self.save_interval, "log_interval": self.log_interval,
                       "eval_iters": self.eval_iters, "data.seq_length": self.data.seq_length,
                       "data.micro_batch_size": self.data.micro_batch_size,
                       "data.global_batch_size": self.data.global_batch_size,
                       "max_consecutive_nonfinite": self.max_consecutive_nonfinite}, 1)
        check_numbers({"keep_last": self.keep_last, "schedule.decay_steps": self.schedule.decay_steps}, 1, optional=True)
        check_numbers({"eval_interval": self.eval_interval, "schedule.warmup_steps": self.schedule.warmup_steps,
                       "schedule.wsd_decay_steps": self.schedule.wsd_decay_steps}, 0)
        check_numbers({"optim.lr": self.optim.lr, "optim.min_lr": self.optim.min_lr,
                       "optim.weight_decay": self.optim.weight_decay, "optim.clip_grad": self.optim.clip_grad,
                       "optim.adam_eps": self.optim.adam_eps}, 0, integer=False)
        s = self.schedule
        if s.warmup_steps and s.warmup_steps >= self.steps:
            raise ValueError(f"schedule.warmup_steps={s.warmup_steps} must be smaller than steps={self.steps}: "
                             "lower the warmup or raise steps")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr={self.optim.min_lr} exceeds optim.lr={self.optim.lr}: lower min_lr")
        if s.style == "WSD" and s.wsd_decay_steps > (s.decay_steps or self.steps):
            raise ValueError(f"schedule.wsd_decay_steps={s.wsd_decay_steps} exceeds the decay length "
                             f"{s.decay_steps or self.steps}: shorten it")
        for name, beta in (("optim.adam_beta1", self.optim.adam_beta1), ("optim.adam_beta2", self.optim.adam_beta2)):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}={beta!r} must be in [0, 1)")
        from megatron_xomni.training import faults

        faults.parse(self.debug_kill)
        self.model.validate()
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}: use auto, fp32, bf16 or fp8")
        if self.trainable not in ("all", "vision"):
            raise ValueError(f"trainable={self.trainable!r}: use all or vision")
        if self.schedule.style not in ("constant", "cosine", "linear", "WSD", "inverse-square-root"):
            raise ValueError(f"schedule.style={self.schedule.style!r}: use constant, cosine, linear or WSD")
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}: raise the latter or shorten sequences"
            )
        nmb = self.num_microbatches(world_size)
        self.parallel.validate(
            world_size,
            num_attention_heads=self.model.num_attention_heads,
            num_query_groups=self.model.num_query_groups,
            num_layers_total=self.model.num_layers_total,
            seq_length=self.data.seq_length,
            vocab_sizes={"model.text_vocab_size": self.model.text_vocab_size,
                         "model.image_table_size": self.model.image_table_size},
            have_te_attention=have_te_attention,
            num_microbatches=nmb,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
