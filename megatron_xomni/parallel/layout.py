"""One typed config for the parallel layout, validated before any process group starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the fix."""


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


@dataclass
class ParallelConfig:
    """How one model replica is split over ranks. Data parallelism is what is left over."""

    tensor_parallel: int = 1
    """TP: attention heads, MLP and vocabulary split over this many ranks."""
    pipeline_parallel: int = 1
    """PP: layers split into this many consecutive stages."""
    virtual_pipeline_parallel: Optional[int] = None
    """Interleaved PP: model chunks per pipeline rank (None = plain 1F1B)."""
    sequence_parallel: bool = False
    """SP: norms/dropout activations split along the sequence over the TP group (needs TP > 1)."""
    context_parallel: int = 1
    """CP: the sequence split over ranks for attention (needs Transformer Engine attention)."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        """DP size for a given world size (validates divisibility)."""
        self.validate_world(world_size)
        return world_size // self.model_parallel_size

    # ---- validation -------------------------------------------------------------------
    def validate_world(self, world_size: int) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}={getattr(self, name)} must be >= 1")
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel} = "
                f"{self.model_parallel_size}: use a multiple of {self.model_parallel_size} ranks "
                f"or a layout whose product divides {world_size}"
            )

    def validate(
        self,
        world_size: int,
        *,
        num_attention_heads: int,
        num_query_groups: int,
        num_layers_total: int,
        seq_length: Optional[int] = None,
        vocab_sizes: dict[str, int] | None = None,
        have_te_attention: bool = False,
        num_microbatches: Optional[int] = None,
    ) -> None:
        """Raise LayoutError (one line naming the fix) for every layout that cannot work."""
        self.validate_world(world_size)
        tp, pp, cp = self.tensor_parallel, self.pipeline_parallel, self.context_parallel
        if num_attention_heads % tp:
            raise LayoutError(
                f"num_attention_heads={num_attention_heads} is not divisible by "
                f"tensor_parallel={tp}: use tensor_parallel in {_divisors(num_attention_heads)}"
            )
        if num_query_groups % tp:
            raise LayoutError(
                f"num_query_groups (KV heads)={num_query_groups} is not divisible by "
                f"tensor_parallel={tp}: use tensor_parallel in {_divisors(num_query_groups)}"
            )
        for name, size in (vocab_sizes or {}).items():
            if size % tp:
                raise LayoutError(
                    f"{name}={size} is not divisible by tensor_parallel={tp}: pad the table to a "
                    f"multiple of {tp} (e.g. {-(-size // (128 * tp)) * 128 * tp})"
                )
        chunks = pp * (self.virtual_pipeline_parallel or 1)
        if num_layers_total % chunks:
            raise LayoutError(
                f"{num_layers_total} transformer layers (LM + vision blocks) cannot be split into "
                f"pipeline_parallel*virtual_pipeline_parallel = {chunks} equal chunks: use a "
                f"chunk count in {_divisors(num_layers_total)}"
            )
        if self.virtual_pipeline_parallel is not None:
            if self.virtual_pipeline_parallel < 2:
                raise LayoutError(
                    f"virtual_pipeline_parallel={self.virtual_pipeline_parallel}: use None for "
                    "plain 1F1B or >= 2 chunks per rank for interleaving"
                )
            if pp < 2:
                raise LayoutError(
                    "virtual_pipeline_parallel needs pipeline_parallel >= 2: set "
                    "virtual_pipeline_parallel=None or raise pipeline_parallel"
                )
            if num_microbatches is not None and num_microbatches % pp:
                raise LayoutError(
                    f"interleaved pipelining needs the number of microbatches ({num_microbatches}) "
                    f"to be a multiple of pipeline_parallel={pp}: change the global/micro batch size"
                )
        if self.sequence_parallel:
            if tp < 2:
                raise LayoutError(
                    "sequence_parallel=True needs tensor_parallel >= 2: set "
                    "sequence_parallel=False or raise tensor_parallel"
                )
            if seq_length is not None and seq_length % tp:
                raise LayoutError(
                    f"sequence_parallel needs seq_length ({seq_length}) divisible by "
                    f"tensor_parallel={tp}: pad sequences to a multiple of {tp}"
                )
        if cp > 1:
            if not have_te_attention:
                raise LayoutError(
                    f"context_parallel={cp} needs Transformer Engine attention (a GPU with "
                    "transformer-engine installed): set context_parallel=1 on this machine"
                )
            if seq_length is not None and seq_length % (2 * cp):
                raise LayoutError(
                    f"context_parallel={cp} needs seq_length ({seq_length}) divisible by "
                    f"2*context_parallel={2 * cp}: pad sequences"
                )

    def validate_for(
        self,
        model_cfg,
        world_size: int,
        seq_length: Optional[int] = None,
        num_microbatches: Optional[int] = None,
        have_te_attention: bool = False,
        decoding: bool = False,
    ) -> None:
        """The one layout check of every stage (training, GRPO, inference, conversion, submit).

        `model_cfg` is any object with the XOmniModelConfig fields (num_attention_heads,
        num_query_groups, num_layers_total, text_vocab_size, image_table_size): this floor does not
        import the model. Both vocabulary tables are split over TP, so both must divide.
        `decoding=True` (generation, GRPO rollouts) refuses sequence and context parallelism: decoding
        runs one token at a time, which a sequence split over TP or CP ranks cannot hold."""
        self.validate(
            world_size,
            num_attention_heads=model_cfg.num_attention_heads,
            num_query_groups=model_cfg.num_query_groups,
            num_layers_total=model_cfg.num_layers_total,
            seq_length=seq_length,
            vocab_sizes={"model.text_vocab_size": model_cfg.text_vocab_size,
                         "model.image_table_size": model_cfg.image_table_size},
            have_te_attention=have_te_attention,
            num_microbatches=num_microbatches,
        )
        if decoding and self.sequence_parallel:
            raise LayoutError("generation decodes one token at a time: set parallel.sequence_parallel=False "
                              "for inference and GRPO")
        if decoding and self.context_parallel > 1:  # a one-token step has no sequence to split over CP ranks
            raise LayoutError(f"generation decodes one token at a time: set parallel.context_parallel=1 "
                              f"(not {self.context_parallel}) for inference and GRPO")

    def describe(self, world_size: int) -> str:
        vpp = f" VPP={self.virtual_pipeline_parallel}" if self.virtual_pipeline_parallel else ""
        sp = " SP" if self.sequence_parallel else ""
        return (
            f"TP={self.tensor_parallel} PP={self.pipeline_parallel}{vpp} CP={self.context_parallel}"
            f"{sp} DP={self.data_parallel(world_size)} (world {world_size})"
        )
