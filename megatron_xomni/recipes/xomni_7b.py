"""X-Omni 7B stages with the paper's numbers (../shared/reference/xomni.md section 4).

Layouts target 8-GPU H100/H200 nodes. 28 query / 4 KV heads allow TP in {1, 2, 4}; 36 layers
(4 + 28 + 4) split evenly over PP in {1, 2, 3, 4, 6, 9, ...}. At 16,384 tokens per sample:
TP=4 with SP keeps activations per GPU small, CP=2 halves attention memory, PP=1 avoids bubbles;
DP = world / (TP*CP) (e.g. 32 nodes x 8 GPUs = 256 GPUs -> DP 32) with the distributed optimizer.
"""

from megatron_xomni.training.config import DataConfig, ARRunConfig, ScheduleConfig
from megatron_xomni.models.xomni import model_preset
from megatron_xomni.parallel import ParallelConfig
from megatron_xomni.recipes import recipe
from megatron_xomni.training.optim import OptimConfig


def _base(name: str) -> ARRunConfig:
    return ARRunConfig(
        name=name,
        model=model_preset("xomni"),
        parallel=ParallelConfig(tensor_parallel=4, sequence_parallel=True, context_parallel=2),
        optim=OptimConfig(lr=1e-4, min_lr=1e-4, weight_decay=0.1, clip_grad=1.0,
                          use_distributed_optimizer=True, overlap_grad_reduce=True),
        schedule=ScheduleConfig(style="constant", warmup_steps=500),
        data=DataConfig(blend=["data/xomni/pretrain_generation"], seq_length=16384, micro_batch_size=1,
                        global_batch_size=256, eod_id=151643),
        precision="bf16", save_interval=500, log_interval=10, keep_last=3,
        init_from="ckpt/qwen2.5-7b-xomni", save_dir=f"runs/{name}",
    )


@recipe
def xomni_7b_pt1() -> ARRunConfig:
    """PT-1: vision blocks + image embeddings/norm/head only, generation data, 10K steps, 1e-4 const."""
    cfg = _base("xomni_7b_pt1")
    cfg.trainable, cfg.steps = "vision", 10_000
    return cfg


@recipe
def xomni_7b_pt2() -> ARRunConfig:
    """PT-2: everything, generation + understanding, 150K steps (629B tokens), 1e-4 const."""
    cfg = _base("xomni_7b_pt2")
    cfg.steps, cfg.init_from = 150_000, "runs/xomni_7b_pt1"
    cfg.data.blend = [0.86, "data/xomni/pretrain_generation", 0.14, "data/xomni/pretrain_understanding"]
    return cfg


@recipe
def xomni_7b_pt3() -> ARRunConfig:
    """PT-3: 42B filtered tokens (~10K steps), LR annealed with warmup-stable-decay."""
    cfg = xomni_7b_pt2()
    cfg.name, cfg.save_dir, cfg.init_from = "xomni_7b_pt3", "runs/xomni_7b_pt3", "runs/xomni_7b_pt2"
    cfg.steps = 10_000
    cfg.optim.min_lr = 0.0
    cfg.schedule = ScheduleConfig(style="WSD", warmup_steps=0, wsd_decay_steps=10_000, wsd_decay_style="cosine")
    cfg.data.blend = ["data/xomni/pt3_filtered"]
    return cfg


@recipe
def xomni_7b_sft() -> ARRunConfig:
    """SFT: 1.5B packed tokens, batch 64 x 16,384, LR 1e-5 -> 0."""
    cfg = _base("xomni_7b_sft")
    cfg.init_from, cfg.steps = "runs/xomni_7b_pt3", 1_500
    cfg.optim.lr, cfg.optim.min_lr = 1e-5, 0.0
    cfg.schedule = ScheduleConfig(style="cosine", warmup_steps=50)
    cfg.data.global_batch_size, cfg.data.pack_documents = 64, True
    cfg.data.blend = ["data/xomni/sft"]
    return cfg
