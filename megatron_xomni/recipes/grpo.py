"""GRPO recipes (X-Omni section 5): G = 16, lr 1e-6, beta = 0.01, 200 steps, batch 512."""

from megatron_xomni.data.prompts import PromptConfig
from megatron_xomni.models.xomni import model_preset
from megatron_xomni.parallel import ParallelConfig
from megatron_xomni.recipes import recipe
from megatron_xomni.rl.grpo import GRPOConfig
from megatron_xomni.inference.sampling import SamplingConfig
from megatron_xomni.rl.trainer import GRPORunConfig
from megatron_xomni.training.optim import OptimConfig


@recipe
def xomni_7b_grpo() -> GRPORunConfig:
    """X-Omni's RL stage: 32 prompts x G=16 = 512 samples/step, 200 steps, lr 1e-6, k3 KL beta 0.01.

    Rollouts run in the training layout (TP=4 per node group, DP over the rest; no SP while decoding).
    Clip epsilon is not disclosed by the paper; 0.2 on both sides is the usual default.

    Prompts: a JSONL file (placeholder path data/xomni/rl_prompts.jsonl; the paper uses 180K prompts),
    one {"prompt": ...} per line plus "text" (the words to render, or null) for the OCR reward; set
    prompts.source=... to yours. Rewards, wired by name: HPSv2 (aesthetics), the VLM judge (text-image
    alignment) and OCR (the text the prompt asks for) - 3 of the paper's 4. The paper's fourth, Unified
    Reward (a preference model), is not built here. The paper does not disclose its weights; the
    defaults are equal weights of 1.0. HPSv2's cosine spans ~0.2-0.35 while the judge and OCR span
    [0, 1], so within a group HPSv2 moves the total least: raise rewards.hpsv2 to weigh aesthetics more.
    The paper's judge is Qwen2.5-VL-32B; the default is the 7B-Instruct checkpoint because every rank
    holds its judge beside the policy and reference (a 32B judge in bf16 alone is ~64 GB): point
    reward_args.vlm_judge.model_dir at a 32B checkpoint where memory allows.
    Local paths (checkpoints, tokenizers, decoder, reward model folders, prompt file) are checked
    when the job starts; submit and --dry-run check only the layout and types.
    """
    return GRPORunConfig(
        name="xomni_7b_grpo", model=model_preset("xomni"), parallel=ParallelConfig(tensor_parallel=4),
        optim=OptimConfig(lr=1e-6, min_lr=1e-6, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=True),
        grpo=GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.2, kl_beta=0.01, loss_aggregation="sequence"),
        sampling=SamplingConfig(temperature=1.0, min_p=0.03), group_size=16, prompts_per_step=32, steps=200,
        image_height=384, image_width=384, init_from="runs/xomni_7b_sft", decoder_steps=28,
        text_tokenizer="ckpt/qwen2.5-tokenizer", image_tokenizer="ckpt/siglip-vq", decoder="ckpt/xomni-decoder",
        prompts=PromptConfig(source="data/xomni/rl_prompts.jsonl", seed=777),
        rewards={"hpsv2": 1.0, "vlm_judge": 1.0, "ocr_text": 1.0},
        reward_args={"hpsv2": {"model_dir": "ckpt/hpsv2", "device": "cuda", "dtype": "bfloat16"},
                     "vlm_judge": {"model_dir": "ckpt/qwen2.5-vl-7b-instruct", "device": "cuda", "dtype": "bfloat16"}},
        save_dir="runs/xomni_7b_grpo",
    )


@recipe
def tiny_grpo() -> GRPORunConfig:
    """The tiny CPU analogue on the built-in world (64 px = 4x4 codes); paths set by the demo.

    The decoder is not the policy: one decoder seed per group (shared_decoder_seed, common random
    numbers) and reward_decodes=1; zero-variance groups are dropped. The demo passes its own steps,
    G, lr and KL weight (DemoConfig grpo_*; `xomni demo --set grpo_lr=...`). Measured with the
    2026-12-01 tiny tokenizer/decoder (ceiling 0.155): no setting moved the held-out reward
    (reports/tiny_demo/NOTES.md) - the settings are not tuned against the final tokenizer.
    """
    return GRPORunConfig(
        name="tiny_grpo", model=model_preset("tiny"),
        optim=OptimConfig(lr=1e-4, min_lr=1e-4, weight_decay=0.0, clip_grad=1.0),
        grpo=GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.01, loss_aggregation="sequence",
                        micro_batch_size=8),
        sampling=SamplingConfig(temperature=1.0, min_p=0.03), group_size=8, prompts_per_step=8, steps=20,
        image_height=64, image_width=64, decoder_steps=8, rewards={"world_alignment": 1.0},
        shared_decoder_seed=True, reward_decodes=1,
        prompts=PromptConfig(skills=["single_object", "two_objects", "counting", "colors", "position", "color_attr"]),
        init_from="runs/tiny/sft", text_tokenizer="runs/tiny/text_tokenizer", image_tokenizer="runs/tiny/siglip_vq/export/tokenizer",
        decoder="runs/tiny/decoder", save_dir="runs/tiny/grpo", save_interval=5,
    )
