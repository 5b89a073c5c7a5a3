"""X-Omni's two additions to a megatron-core transformer block.

- `XOmniVisionLayer`: a normal transformer layer whose result is kept at image positions only;
  text positions leave it bit-identical (their keys/values still take part in attention,
  exactly as in the released `XOmniDecoderLayer`).
- `XOmniFinalNorm`: the text norm at text positions and the image norm at image positions.

Both read the image-position mask from an `ImagePositions` holder that the model fills
before each forward. The holder avoids threading a new argument through megatron-core's
block/layer signatures; because the mask is read at forward time, activation recomputation of
these modules is refused by the model config (a recomputed forward could see another
micro-batch's mask).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer


class ImagePositions:
    """Mask of image positions in the *local* activation layout [s_local, b, 1] (bool)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None


class _ReadsImagePositions:
    image_positions: Optional[ImagePositions] = None

    def _mask(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        holder = self.image_positions
        if holder is None or holder.mask is None:
            return None
        mask = holder.mask
        if mask.shape[0] != hidden_states.shape[0] or mask.shape[1] != hidden_states.shape[1]:
            raise RuntimeError(
                f"image-position mask {tuple(mask.shape)} does not match activations "
                f"{tuple(hidden_states.shape)}"
            )
        return mask


class XOmniVisionLayer(_ReadsImagePositions, TransformerLayer):
    """Transformer layer that only updates image positions."""

    def forward(self, *args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = self._mask(hidden_states)
        if mask is None:  # no mask set: every position is text and passes through unchanged
            return hidden_states, kwargs.get("context")
        output, context = super().forward(*args, **kwargs)
        return torch.where(mask, output, hidden_states), context


class XOmniFinalNorm(_ReadsImagePositions, MegatronModule):
    """Per-position final norm: `image_norm` at image positions, `text_norm` elsewhere."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, norm_cls=None):
        super().__init__(config=config)
        self.text_norm = norm_cls(config=config, hidden_size=hidden_size, eps=eps)
        self.image_norm = norm_cls(config=config, hidden_size=hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self._mask(hidden_states)
        text = self.text_norm(hidden_states)
        if mask is None:
            return text
        return torch.where(mask, self.image_norm(hidden_states), text)
