"""Reward plugins for GRPO: a registry, a weighted ensemble and the built-in rewards
(``world_alignment``, ``ocr_text``, ``hpsv2``, ``vlm_judge``). Built-ins load their heavy
dependencies (onnxruntime, transformers) only when instantiated."""
from megatron_xomni.rewards.registry import (
    RewardEnsemble,
    RewardFn,
    RewardResult,
    available_rewards,
    check_reward,
    check_reward_inputs,
    get_reward,
    register_reward,
    required_fields,
)

__all__ = [
    "RewardEnsemble",
    "RewardFn",
    "RewardResult",
    "available_rewards",
    "check_reward",
    "check_reward_inputs",
    "get_reward",
    "register_reward",
    "required_fields",
]
