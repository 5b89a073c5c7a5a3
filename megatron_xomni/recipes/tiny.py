"""Tiny recipes: the whole X-Omni pipeline on a CPU in minutes (built-in data world, 64 px images)."""

from megatron_xomni.training.config import DataConfig, ARRunConfig, ScheduleConfig
from megatron_xomni.models.xomni import model_preset
from megatron_xomni.recipes import recipe
from megatron_xomni.training.optim import OptimConfig


@recipe
def tiny_pt() -> ARRunConfig:
    """Pre-training of the tiny model on tokenized world data (generation + understanding)."""
    return ARRunConfig(
        name="tiny_pt",
        model=model_preset("tiny"),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0),
        schedule=ScheduleConfig(style="cosine", warmup_steps=10),
        data=DataConfig(blend=[0.7, "runs/tiny/tokens/world_generation", 0.3, "runs/tiny/tokens/world_understanding"],
                        seq_length=64, micro_batch_size=8,
                        global_batch_size=16, eod_id=1),
        steps=200, save_interval=50, log_interval=10, save_dir="runs/tiny/pt",
        peak_tflops=1.0,  # a CPU, not an H100: MFU is then "of 1 TFLOP/s"
    )


@recipe
def tiny_pt1() -> ARRunConfig:
    """PT-1 analogue: only the vision blocks and image embedding/norm/head train."""
    cfg = tiny_pt()
    cfg.name, cfg.trainable, cfg.save_dir = "tiny_pt1", "vision", "runs/tiny/pt1"
    cfg.schedule = ScheduleConfig(style="constant")
    return cfg


@recipe
def tiny_sft() -> ARRunConfig:
    """SFT: packed documents, lower LR decaying to zero, initialised from tiny_pt."""
    cfg = tiny_pt()
    cfg.name, cfg.save_dir, cfg.init_from = "tiny_sft", "runs/tiny/sft", "runs/tiny/pt"
    cfg.optim.lr, cfg.optim.min_lr = 1e-3, 0.0
    cfg.schedule = ScheduleConfig(style="cosine", warmup_steps=0)
    cfg.data.pack_documents = True
    cfg.data.blend = ["runs/tiny/data/world_sft"]
    cfg.steps = 100
    return cfg
