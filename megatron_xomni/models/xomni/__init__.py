"""The unified X-Omni AR model: Qwen2.5 layout + image embedding/norm/head + vision blocks."""
from megatron_xomni.models.xomni.config import XOmniModelConfig, model_preset
from megatron_xomni.models.xomni.model import XOmniModel, mode_logits

__all__ = ["XOmniModelConfig", "XOmniModel", "model_preset", "mode_logits"]
