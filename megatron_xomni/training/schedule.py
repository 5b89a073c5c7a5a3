"""One learning-rate schedule for every trainer: megatron-core's OptimizerParamScheduler.

It drives any optimizer with `param_groups` (megatron-core's and torch's alike), so the AR model,
GRPO, the decoder and the SigLIP-VQ tokenizer share warmup, decay styles (constant, linear, cosine,
inverse-square-root, WSD) and the resume rule (the recipe's values win; only the step count comes
from a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule."""

    style: str = "constant"
    """constant | linear | cosine | inverse-square-root | WSD (warmup-stable-decay, for annealing)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_steps: Optional[int] = None
    """Steps over which the LR decays (default: the run's steps)."""
    wsd_decay_steps: int = 0
    """WSD only: length of the final decay phase."""
    wsd_decay_style: str = "linear"
    """WSD only: shape of the final decay (linear | cosine | exponential | minus_sqrt)."""

    def validate(self, steps: int) -> None:
        from megatron_xomni.dataclass_utils import check_numbers

        if self.style not in STYLES:
            raise ValueError(f"schedule.style={self.style!r}: use one of {', '.join(STYLES)}")
        check_numbers({"schedule.warmup_steps": self.warmup_steps, "schedule.wsd_decay_steps": self.wsd_decay_steps}, 0)
        check_numbers({"schedule.decay_steps": self.decay_steps}, 1, optional=True)
        if self.warmup_steps and self.warmup_steps >= steps:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps} must be smaller than steps={steps}: "
                             "lower the warmup or raise steps")
        if self.style == "WSD" and self.wsd_decay_steps > (self.decay_steps or steps):
            raise ValueError(f"schedule.wsd_decay_steps={self.wsd_decay_steps} exceeds the decay length "
                             f"{self.decay_steps or steps}: shorten it")


def build_scheduler(optimizer, schedule: ScheduleConfig, lr: float, min_lr: float, weight_decay: float, steps: int):
    """The scheduler for `steps` optimizer steps. The recipe's values always win over a resumed
    checkpoint's: only the step count comes from `load_state_dict`."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = schedule.decay_steps or steps
    wsd = schedule.style == "WSD"
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if schedule.warmup_steps else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=decay, lr_decay_style=schedule.style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        wsd_decay_steps=schedule.wsd_decay_steps if wsd else None,
        lr_wsd_decay_style=schedule.wsd_decay_style if wsd else None,
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
