"""Building decoder run configs in tests from flat keyword arguments."""
from __future__ import annotations

from megatron_xomni.training.flux_decoder import DecoderRunConfig
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.schedule import ScheduleConfig


def decoder_cfg(lr: float = 1e-3, warmup_steps: int = 1, weight_decay: float = 0.0, clip_grad: float = 1.0,
                adam_beta2: float = OptimConfig.adam_beta2, **fields) -> DecoderRunConfig:
    """A DecoderRunConfig with a constant LR after `warmup_steps` of linear warmup."""
    return DecoderRunConfig(optim=OptimConfig(lr=lr, min_lr=lr, weight_decay=weight_decay, clip_grad=clip_grad,
                                              adam_beta2=adam_beta2),
                            schedule=ScheduleConfig(style="constant", warmup_steps=warmup_steps), **fields)
