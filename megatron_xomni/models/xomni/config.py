"""Configuration of the unified X-Omni autoregressive model (Qwen2.5 layout + vision blocks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class XOmniModelConfig:
    """Model dimensions. Token ids: [0, text_vocab_size) are text, text_vocab_size + k is image code k."""

    num_layers: int = 28
    """Language-model (Qwen2.5) decoder layers."""
    hidden_size: int = 3584
    """Residual stream width."""
    ffn_hidden_size: int = 18944
    """SwiGLU intermediate width."""
    num_attention_heads: int = 28
    """Query heads."""
    num_query_groups: int = 4
    """Key/value heads (GQA groups)."""
    text_vocab_size: int = 152064
    """Rows of the text embedding / outputs of the text head (Qwen's padded vocabulary)."""
    text_vocab_padding: int = 0
    """Trailing text rows that are no token: the converter pads an HF text table to a multiple of 128 so one
    checkpoint loads at every TP in {1, 2, 4, 8}. The text head masks them to -inf (never sampled, never in
    the loss); export strips them."""
    image_vocab_size: int = 16384
    """Image codes the model can emit (the tokenizer codebook size)."""
    image_table_size: int = 16448
    """Rows of the image embedding and outputs of the image head (codes + spare slots)."""
    num_vision_adapter_layers: int = 4
    """Vision-specific blocks before the LM stack (update image positions only)."""
    num_vision_head_layers: int = 4
    """Vision-specific blocks after the LM stack (update image positions only)."""
    rotary_base: float = 1_000_000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    max_position_embeddings: int = 32768
    """Longest sequence RoPE is prepared for."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of new weights."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (Qwen2.5: 0)."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches (Qwen2.5: 0)."""

    @property
    def num_layers_total(self) -> int:
        """All transformer layers in the stack, vision blocks included."""
        return self.num_vision_adapter_layers + self.num_layers + self.num_vision_head_layers

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_vision_layer(self, global_index: int) -> bool:
        """True for the vision blocks (0-based index into the whole stack)."""
        return (
            global_index < self.num_vision_adapter_layers
            or global_index >= self.num_vision_adapter_layers + self.num_layers
        )

    def validate(self) -> None:
        from megatron_xomni.dataclass_utils import check_numbers

        check_numbers({f"model.{k}": getattr(self, k) for k in (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "text_vocab_size", "image_vocab_size", "image_table_size", "max_position_embeddings")}, 1)
        check_numbers({"model.num_vision_adapter_layers": self.num_vision_adapter_layers,
                       "model.num_vision_head_layers": self.num_vision_head_layers}, 0)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if not 0 <= self.text_vocab_padding < self.text_vocab_size:
            raise ValueError(
                f"text_vocab_padding={self.text_vocab_padding} must be in [0, text_vocab_size="
                f"{self.text_vocab_size})"
            )
        if self.image_table_size < self.image_vocab_size:
            raise ValueError(
                f"image_table_size={self.image_table_size} < image_vocab_size="
                f"{self.image_vocab_size}: the table must hold every code"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "XOmniModelConfig":
        from megatron_xomni.dataclass_utils import strict_from_dict

        return strict_from_dict(cls, d)

    def transformer_config(self, parallel, params_dtype: torch.dtype = torch.float32, **overrides):
        """megatron-core TransformerConfig for this model under a ParallelConfig."""
        from megatron.core.transformer import TransformerConfig

        from megatron_xomni.device import transformer_engine_usable

        # Fused kernels (bias-SwiGLU, bias-dropout-add, RoPE, wgrad accumulation) come from
        # Transformer Engine / CUDA; the local spec on CPU runs the plain PyTorch paths.
        fused = transformer_engine_usable()
        kwargs = dict(
            num_layers=self.num_layers_total,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=True,
            bias_activation_fusion=fused,
            masked_softmax_fusion=False,  # only used by the local DotProductAttention (we use SDPA)
            bias_dropout_fusion=fused,
            apply_rope_fusion=fused,
            persist_layer_norm=False,
            gradient_accumulation_fusion=fused,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
            sequence_parallel=parallel.sequence_parallel,
            context_parallel_size=parallel.context_parallel,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            pipeline_dtype=params_dtype,
            use_cpu_initialization=True,
            # gloo: prev and next peers coincide at PP=2; batched p2p then crosses pairs.
            batch_p2p_comm=False,
            batch_p2p_sync=False,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def _tiny() -> XOmniModelConfig:
    return XOmniModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        text_vocab_size=512,
        image_vocab_size=256,
        image_table_size=320,
        num_vision_adapter_layers=1,
        num_vision_head_layers=1,
        max_position_embeddings=1024,
    )


PRESETS = {
    # X-Omni: Qwen2.5-7B + 16,384 image codes (16,448-row table) + 4 + 4 vision blocks.
    "xomni": XOmniModelConfig,
    # Trains in seconds on a CPU.
    "tiny": _tiny,
}
# One preset vocabulary for every config (tiny / xomni): the old names are one-line errors.
OLD_PRESETS = {"xomni_7b": "xomni"}


def model_preset(name: str, **overrides) -> XOmniModelConfig:
    if name in OLD_PRESETS:
        raise ValueError(f"model preset `{name}` is now `{OLD_PRESETS[name]}`: use model_preset({OLD_PRESETS[name]!r})")
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown model config field {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    return cfg
