"""The resolved configuration of one training run, composed of typed sections.

Recipes (top-level `recipes/`) are small Python functions returning a `RunConfig`; they derive
from each other. `key=value` overrides address fields by dotted path (`optim.lr=1e-5`,
`parallel.tensor_parallel=2`, `model.num_layers=4`). The fully resolved config is printed at
start and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.parallel.layout import ParallelConfig
from megatron_xomni.training.optim import OptimConfig


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (megatron-core's OptimizerParamScheduler)."""

    style: str = "constant"
    """constant | cosine | linear | WSD (warmup-stable-decay, for annealing)."""
    warmup_iters: int = 0
    """Linear warmup steps."""
    decay_iters: Optional[int] = None
    """Steps over which the LR decays (default: train_iters)."""
    wsd_decay_iters: int = 0
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
    train_iters: int = 1000
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


# ---- key=value overrides ---------------------------------------------------------------
def _parse_value(text: str, current: Any, annotation) -> Any:
    if text.lower() in ("none", "null"):
        return None
    kind = type(current) if current is not None else None
    if kind is None:
        args = [a for a in typing.get_args(annotation) if a is not type(None)] if annotation else []
        kind = args[0] if args and isinstance(args[0], type) else None
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if kind in (int, float, str):
        return kind(float(text)) if kind is int and ("e" in text.lower() or "." in text) else kind(text)
    if kind in (list, dict):
        return json.loads(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg, overrides: list[str]):
    """Apply `a.b=value` strings to a dataclass tree in place; unknown keys are errors."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-5)")
        key, text = item.split("=", 1)
        obj, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ValueError(f"unknown config section {p!r} in override {item!r}")
            obj = getattr(obj, p)
        name = parts[-1]
        fields_ = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields_:
            close = ", ".join(sorted(fields_)[:12])
            raise ValueError(f"unknown config key {key!r}: {type(obj).__name__} has {close}, ...")
        hints = typing.get_type_hints(type(obj))
        try:
            value = _parse_value(text, getattr(obj, name), hints.get(name))
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
        setattr(obj, name, value)
    return cfg
