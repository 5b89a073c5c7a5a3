"""The run config of the AR stages (PT-1, PT-2, PT-3, SFT): the run section plus typed sections.

Recipes (megatron_xomni/recipes/) are small Python functions returning an `ARRunConfig`; they
derive from each other. `key=value` overrides address fields by dotted path (`optim.lr=1e-5`,
`parallel.tensor_parallel=2`, `model.num_layers=4`, `steps=100`). The fully resolved config is
printed at start and saved beside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from megatron_xomni.dataclass_utils import apply_overrides, check_numbers  # noqa: F401  (apply_overrides re-exported)
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.parallel.layout import ParallelConfig
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.run import InputError, RunSection
from megatron_xomni.training.schedule import ScheduleConfig  # noqa: F401  (recipes import it from here)


@dataclass
class DataConfig:
    """Token data (files written by the tokenize stage: python -m megatron_xomni.train tiny_tokenize) and batch shape."""

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
class ARRunConfig(RunSection):
    """Everything one AR training run needs (the run section's fields come first)."""

    RUNNER: ClassVar[str] = "megatron_xomni.training.trainer:train"

    model: XOmniModelConfig = field(default_factory=XOmniModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8 (Transformer Engine, GPU)."""
    trainable: str = "all"
    """all | vision (X-Omni PT-1: vision blocks + image embedding/norm/head only)."""
    init_from: Optional[str] = None
    """Checkpoint root to initialise the model from (e.g. a converted Qwen2.5), model only."""
    eval_interval: int = 0
    """Steps between validation runs (0: never)."""
    eval_iters: int = 2
    """Validation global batches per evaluation."""
    tensorboard_dir: Optional[str] = None
    """Default: <save_dir>/tensorboard."""
    peak_tflops: float = 989.0
    """Per-device dense peak for MFU (H100/H200 bf16: 989)."""
    max_consecutive_nonfinite: int = 5
    """Stop (after a checkpoint) when this many steps in a row have a NaN/Inf loss or gradient."""
    debug_inject_nonfinite_steps: list = field(default_factory=list)
    """Testing aid: poison the gradients at these (1-based) steps to exercise NaN skipping."""
    debug_inject_nonfinite_rank: Optional[int] = None
    """Testing aid: poison them on this rank only (None: every rank)."""

    # ---- derived & validation ----------------------------------------------------------
    def check_paths(self) -> None:
        from megatron_xomni.data.token_dataset import _blend

        if self.init_from and not Path(self.init_from).exists():
            raise InputError(f"init_from={self.init_from} does not exist: convert a checkpoint first (xomni convert)")
        if not self.data.blend:
            raise InputError("data.blend is empty: point it at tokenized data (xomni tokenize)")
        for prefix in _blend(self.data.blend)[0]:
            for suffix in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx"):
                if not Path(prefix + suffix).is_file():
                    raise InputError(f"data file {prefix + suffix} is missing: run tokenization first (xomni tokenize), "
                                     "or fix data.blend")

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
        """One-line ValueError naming the fix for any inconsistent setting (no paths, no process groups)."""
        self.validate_run()
        check_numbers({"eval_iters": self.eval_iters, "data.seq_length": self.data.seq_length,
                       "data.micro_batch_size": self.data.micro_batch_size,
                       "data.global_batch_size": self.data.global_batch_size,
                       "max_consecutive_nonfinite": self.max_consecutive_nonfinite}, 1)
        check_numbers({"eval_interval": self.eval_interval}, 0)
        self.optim.validate()
        self.schedule.validate(self.steps)
        self.model.validate()
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}: use auto, fp32, bf16 or fp8")
        if self.trainable not in ("all", "vision"):
            raise ValueError(f"trainable={self.trainable!r}: use all or vision")
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}: raise the latter or shorten sequences"
            )
        nmb = self.num_microbatches(world_size)
        self.parallel.validate_for(self.model, world_size, seq_length=self.data.seq_length, num_microbatches=nmb,
                                   have_te_attention=have_te_attention)

