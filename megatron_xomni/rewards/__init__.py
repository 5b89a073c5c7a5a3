"""Reward plugins for GRPO: a registry, a weighted ensemble and the built-in rewards
(``world_alignment``, ``ocr_text``, ``hpsv2``, ``vlm_judge``). Built-ins load their heavy
dependencies (onnxruntime, transformers) only when instantiated."""
from megatron_xomni.rewards.registry import (
    RewardEnsemble,
    RewardFn,
    RewardResult,
    available_rewards,
    get_reward,
    register_reward,
)

__all__ = [
    "RewardEnsemble",
    "RewardFn",
    "RewardResult",
    "available_rewards",
    "get_reward",
    "register_reward",
]
