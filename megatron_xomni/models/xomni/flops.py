"""FLOP and parameter accounting of the X-Omni AR model (whole model, summed over all ranks).

Two FLOP counts, both in multiply-accumulates x 2 (one FLOP per multiply and per add):

*Executed* (`executed_flops`): the matmuls `model.py` really runs. Today the model
- runs the text head and the image head at every position (it returns both logits; the loss
  picks one per position afterwards; only RL scoring forwards skip positions or a head, through
  `XOmniModel(logits_from=..., only_head=...)`),
- runs every vision block at every position (`XOmniVisionLayer` computes the whole layer, then
  keeps the result at image positions only),
- computes attention with SDPA. Counted like torch's `FlopCounterMode` counts SDPA: the full
  s x s score matrix for QK^T and for AV (GQA costs as many as the query heads), and a backward
  of 5 such matmuls (the fused kernels recompute the scores, then 4 gradient matmuls), i.e.
  2.5x the forward, while every linear layer's backward is 2x its forward (input and weight
  gradients). The causal flash kernels skip tiles above the diagonal, so for causal attention
  this is an upper bound (about 2x the arithmetic they do); the explicit-mask path (packed
  sequences) and the math kernel do compute every score. The math kernel's backward has 4
  matmuls, not 5.
Norms, RoPE, softmax, SwiGLU's elementwise product, embedding lookups and the loss are not
matmuls and are not counted (FlopCounterMode does not count them either). So the executed count
does not depend on which positions are text or image.

*Model* FLOPs for MFU (`model_flops`): the usual convention, 6 x (matmul weights one token uses)
per trained token plus the attention term, for the real architecture:
- GQA (K/V projections of `num_query_groups` heads), SwiGLU (3 matrices), QKV biases ignored,
- one head per position: the text head at text positions, the image head (its full
  `image_table_size` rows, as built, like the padded text vocabulary) at image positions,
- vision blocks at every position, as the released model runs them (their keys/values at text
  positions take part in attention),
- attention: forward QK^T and AV, 2 x 2 x (query heads x kv_channels) per (query, key) pair,
  x3 for training; `causal=True` counts only the s(s+1)/2 causal pairs (what a causal-aware
  kernel must do; Megatron-LM's convention), `causal=False` all s^2 pairs (PaLM's 6N + 12 L H Q T).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_xomni.models.xomni.config import XOmniModelConfig


# ---- parameters -------------------------------------------------------------------------------
def _query_width(m: XOmniModelConfig) -> int:
    return m.num_attention_heads * m.kv_channels


def _kv_width(m: XOmniModelConfig) -> int:
    return m.num_query_groups * m.kv_channels


def layer_matmul_weights(m: XOmniModelConfig) -> int:
    """Weights of the matmuls in one transformer layer (LM and vision layers are alike)."""
    h, q, kv, f = m.hidden_size, _query_width(m), _kv_width(m), m.ffn_hidden_size
    qkv = h * (q + 2 * kv)
    out_proj = q * h
    swiglu = h * 2 * f + f * h  # fc1 holds gate and up; fc2 down
    return qkv + out_proj + swiglu


def layer_params(m: XOmniModelConfig) -> int:
    """All parameters of one transformer layer: matmul weights, QKV bias, two RMSNorm weights."""
    return layer_matmul_weights(m) + (_query_width(m) + 2 * _kv_width(m)) + 2 * m.hidden_size


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the whole model (all pipeline stages, all tensor-parallel shards)."""

    embedding: int
    """Input tables: text embedding + image embedding (lookups, no matmul)."""
    lm_layers: int
    vision_layers: int
    final_norms: int
    """Text and image final RMSNorm weights."""
    heads: int
    """Output layers: text head + image head."""

    @property
    def total(self) -> int:
        return self.embedding + self.lm_layers + self.vision_layers + self.final_norms + self.heads

    @property
    def non_embedding(self) -> int:
        """Everything but the input tables (the heads are matmuls and stay in), Kaplan-style."""
        return self.total - self.embedding


def param_counts(m: XOmniModelConfig) -> ParamCounts:
    h = m.hidden_size
    vision = m.num_vision_adapter_layers + m.num_vision_head_layers
    return ParamCounts(
        embedding=(m.text_vocab_size + m.image_table_size) * h,
        lm_layers=m.num_layers * layer_params(m),
        vision_layers=vision * layer_params(m),
        final_norms=2 * h,
        heads=(m.text_vocab_size + m.image_table_size) * h,
    )


def active_matmul_params(m: XOmniModelConfig, image_fraction: float = 0.0) -> float:
    """Matmul weights one token uses on average: every layer, and the head of its modality."""
    _check_fraction(image_fraction)
    head = (1.0 - image_fraction) * m.text_vocab_size + image_fraction * m.image_table_size
    return m.num_layers_total * layer_matmul_weights(m) + head * m.hidden_size


# ---- FLOPs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        """Forward + backward: one training step's FLOPs for these sequences."""
        return self.forward + self.backward


def _check_fraction(f: float) -> None:
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"image_fraction={f} must be in [0, 1] (the share of image positions)")


def _check_seq(seq_length: int, batch_size: int) -> None:
    if seq_length < 1 or batch_size < 1:
        raise ValueError(f"seq_length={seq_length} and batch_size={batch_size} must be >= 1")


def executed_flops(m: XOmniModelConfig, seq_length: int, batch_size: int = 1) -> Flops:
    """Matmul FLOPs the model runs for `batch_size` sequences of `seq_length` (see module doc)."""
    _check_seq(seq_length, batch_size)
    tokens = seq_length * batch_size
    heads = (m.text_vocab_size + m.image_table_size) * m.hidden_size  # both heads, every position
    linear = 2.0 * tokens * (m.num_layers_total * layer_matmul_weights(m) + heads)
    # QK^T and AV over the full s x s scores of every query head, per sequence and layer
    attention = m.num_layers_total * batch_size * 2 * (2.0 * seq_length * seq_length * _query_width(m))
    return Flops(forward=linear + attention, backward=2.0 * linear + 2.5 * attention)


def model_flops(m: XOmniModelConfig, seq_length: int, image_positions: int = 0, batch_size: int = 1,
                causal: bool = True) -> float:
    """Model FLOPs (forward + backward) of training on `batch_size` sequences of `seq_length`
    positions, `image_positions` of them (per sequence) image positions. See module doc."""
    _check_seq(seq_length, batch_size)
    if not 0 <= image_positions <= seq_length:
        raise ValueError(f"image_positions={image_positions} must be in [0, seq_length={seq_length}]")
    return batch_size * seq_length * model_flops_per_token(
        m, seq_length, image_positions / seq_length, causal)


def model_flops_per_token(m: XOmniModelConfig, seq_length: int, image_fraction: float = 0.0,
                          causal: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward) at a given share of image positions."""
    _check_seq(seq_length, 1)
    weights = 6.0 * active_matmul_params(m, image_fraction)
    pairs = (seq_length + 1) / 2.0 if causal else float(seq_length)  # keys per query, on average
    attention = 3.0 * m.num_layers_total * 2 * (2.0 * pairs * _query_width(m))
    return weights + attention
