"""GRPO for the X-Omni AR model: rollouts in the training layout, log-probs, the GRPO objective."""

from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep, group_advantages, grpo_token_terms, loss_weights
from megatron_xomni.rl.logprobs import compute_logprobs, pack_rollouts, split_microbatches
from megatron_xomni.inference.generation import Rollout, RolloutConfig, generate_images, generate_text
from megatron_xomni.inference.sampling import SamplingConfig

__all__ = [
    "GRPOConfig", "GRPOStep", "group_advantages", "grpo_token_terms", "loss_weights",
    "compute_logprobs", "pack_rollouts", "split_microbatches",
    "Rollout", "RolloutConfig", "generate_images", "generate_text", "SamplingConfig",
]
