"""A family of X-Omni models from one dial, the LM depth (nanochat's single complexity knob).

Rules for depth d (every constant is a field of `ModelFamily`):
- KV heads: ceil(d / 7), i.e. at most 7 query heads per KV head (Qwen2.5's 7:1: 28 -> 4,
  14 -> 2), rounded up to a multiple of `kv_heads_multiple` (set it to the TP size: tensor
  parallelism splits the KV heads);
- query heads: 64 d / 64 (nanochat's aspect ratio 64 over a head size of 64, which keeps
  several heads in small members; X-Omni-7B has 128) rounded up to a multiple of the KV heads;
- hidden size: query heads x 64. So the aspect ratio is 64 where the KV heads divide d
  (d <= 8, 10, 12, 14, 15, 18, ..., 28) and below 64 (1 + KV heads / d) elsewhere; hidden,
  heads and KV heads never shrink as d grows, and the heads of every member split over
  TP = `kv_heads_multiple` ranks;
- SwiGLU width: 8/3 of the hidden size (the FFN cost of a 4x GELU MLP), rounded up to 64;
- vision blocks: round(d / 7) adapter blocks and as many head blocks, at least 1 each
  (X-Omni: 4 + 4 around 28 LM layers, so depth 28 reproduces its layout);
- learning rate: lr_ref * sqrt(hidden_ref / hidden), i.e. lr ∝ 1/sqrt(width) (nanochat's
  muP-free AdamW scaling), anchored at GPT-3 Small's 6e-4 for hidden 768;
- global batch: batch_coeff * C^batch_exponent tokens for a run of C training FLOPs, DeepSeek
  LLM's fitted rule (Bi et al. 2024, eq. 1: B_opt = 0.292 C^0.3271), as sequences of the run's
  length rounded to a multiple of micro-batch x data-parallel size (at least one). The batch
  depends on the compute, not on the size, so the runs of one iso-FLOP budget share one batch and
  differ only in size and steps. The rule was fitted at 1e17-3e20 FLOPs; far below that (the CPU
  sweeps) it is an extrapolation, which `batch_coeff` / `batch_exponent` can replace.
Everything else (vocabularies, RoPE, norm epsilon, positions, init std) comes from the `base`
preset, with `base_overrides` (e.g. the real tokenizer's vocabulary sizes).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

from megatron_xomni.models.xomni.config import XOmniModelConfig, model_preset
from megatron_xomni.models.xomni.flops import param_counts
from megatron_xomni.parallel.layout import LayoutError, ParallelConfig


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9)) * multiple


@dataclass
class ModelFamily:
    base: str = "tiny"
    """Model preset that provides every field the depth does not set."""
    base_overrides: dict = field(default_factory=dict)
    aspect_ratio: int = 64
    """hidden size per LM layer (before rounding the heads to a multiple of the KV heads)."""
    head_dim: int = 64
    gqa_ratio: int = 7
    """At most this many query heads share one KV head."""
    kv_heads_multiple: int = 1
    """KV heads are a multiple of this (set it to the tensor-parallel size)."""
    ffn_ratio: float = 8.0 / 3.0
    ffn_multiple: int = 64
    layers_per_vision_block: int = 7
    """One vision adapter block and one vision head block per this many LM layers (at least 1)."""
    lr_ref: float = 6e-4
    lr_ref_hidden: int = 768
    batch_coeff: float = 0.292
    batch_exponent: float = 0.3271
    """Global batch in tokens = batch_coeff * C^batch_exponent (C: the run's training FLOPs)."""

    # ---- the rules ------------------------------------------------------------------------
    def _check_depth(self, depth: int) -> None:
        if not isinstance(depth, numbers.Integral) or depth < 1:
            raise ValueError(f"depth={depth!r} must be a positive integer (the number of LM layers)")

    def heads(self, depth: int) -> tuple[int, int]:
        """(query heads, KV heads) by the GQA rule."""
        self._check_depth(depth)
        q0 = math.ceil(self.aspect_ratio * depth / self.head_dim)
        kv = _round_up(math.ceil(q0 / self.gqa_ratio), self.kv_heads_multiple)
        return _round_up(q0, kv), kv

    def hidden_size(self, depth: int) -> int:
        return self.heads(depth)[0] * self.head_dim

    def ffn_hidden_size(self, depth: int) -> int:
        return _round_up(self.ffn_ratio * self.hidden_size(depth), self.ffn_multiple)

    def vision_blocks(self, depth: int) -> int:
        """Adapter blocks (= head blocks)."""
        self._check_depth(depth)
        return max(1, math.floor(depth / self.layers_per_vision_block + 0.5))

    def learning_rate(self, depth: int) -> float:
        return self.lr_ref * math.sqrt(self.lr_ref_hidden / self.hidden_size(depth))

    def batch_tokens(self, flops: float) -> float:
        """Tokens per optimizer step for a run of `flops` training FLOPs (before rounding)."""
        if not flops > 0:
            raise ValueError(f"flops={flops!r} must be positive (a run's training FLOPs)")
        return self.batch_coeff * flops ** self.batch_exponent

    def global_batch_size(self, flops: float, seq_length: int, multiple: int = 1) -> int:
        """Sequences per optimizer step: `batch_tokens` over `seq_length`, rounded to the nearest
        multiple of `multiple` (micro-batch size x data-parallel size), at least `multiple`."""
        if seq_length < 1 or multiple < 1:
            raise ValueError(f"seq_length={seq_length} and multiple={multiple} must be >= 1")
        return max(1, round(self.batch_tokens(flops) / seq_length / multiple)) * multiple

    def member(self, depth: int) -> XOmniModelConfig:
        """The model config at this depth."""
        q, kv = self.heads(depth)
        v = self.vision_blocks(depth)
        return model_preset(
            self.base, **{
                **self.base_overrides,
                "num_layers": depth,
                "hidden_size": self.hidden_size(depth),
                "num_attention_heads": q,
                "num_query_groups": kv,
                "ffn_hidden_size": self.ffn_hidden_size(depth),
                "num_vision_adapter_layers": v,
                "num_vision_head_layers": v,
            })

    def describe(self, depth: int) -> dict:
        """One row for a sweep file: the dial, the derived sizes, the parameters and the LR."""
        m = self.member(depth)
        p = param_counts(m)
        return {
            "depth": depth, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups, "ffn_hidden_size": m.ffn_hidden_size,
            "vision_blocks": m.num_vision_adapter_layers, "num_layers_total": m.num_layers_total,
            "params": p.total, "non_embedding_params": p.non_embedding, "lr": self.learning_rate(depth),
        }

    # ---- layout ---------------------------------------------------------------------------
    def validate_member(self, depth: int, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                        seq_length: Optional[int] = None) -> XOmniModelConfig:
        """The member at `depth`, or a one-line LayoutError if it cannot run at this TP/PP."""
        try:
            m = self.member(depth)
        except ValueError as e:
            raise LayoutError(f"family member {e}") from None
        par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vpp)
        try:
            par.validate(
                tp * pp,
                num_attention_heads=m.num_attention_heads,
                num_query_groups=m.num_query_groups,
                num_layers_total=m.num_layers_total,
                seq_length=seq_length,
                vocab_sizes={"text_vocab_size": m.text_vocab_size, "image_table_size": m.image_table_size},
            )
        except LayoutError as e:
            hint = ""
            if "heads" in str(e) and tp > 1:
                hint = (f"; or keep TP={tp} with depths whose head count is a multiple of {tp} and "
                        f"ModelFamily(kv_heads_multiple={tp})")
            raise LayoutError(
                f"family member depth={depth} ({m.hidden_size} hidden, {m.num_attention_heads} heads, "
                f"{m.num_query_groups} KV heads, {m.num_layers_total} layers) does not fit TP={tp} "
                f"PP={pp}: {e}{hint}") from None
        return m


SIZE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
               "num_vision_adapter_layers", "num_vision_head_layers")
"""The model fields a family member sets; every other field comes from the base."""


def family_for(model: XOmniModelConfig, **rules) -> ModelFamily:
    """The family whose members are `model` (e.g. a recipe's, with its vocabularies, RoPE and init)
    with the size fields replaced by the depth's; `rules` set the other ModelFamily fields."""
    base = {k: v for k, v in model.to_dict().items() if k not in SIZE_FIELDS}
    return ModelFamily(base_overrides=base, **rules)


DEFAULT_FAMILY = ModelFamily()


def validate_member(depth: int, tp: int = 1, pp: int = 1, family: Optional[ModelFamily] = None,
                    **kwargs) -> XOmniModelConfig:
    """`ModelFamily.validate_member` of `family` (default: `DEFAULT_FAMILY`)."""
    return (family or DEFAULT_FAMILY).validate_member(depth, tp, pp, **kwargs)
