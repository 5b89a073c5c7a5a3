"""SigLIP contrastive pre-training recipe: the stage before SigLIP-VQ training for the tiny preset.

    python -m megatron_xomni.train tiny_siglip_contrastive data.corpus=runs/tiny/corpus

Full size has no such recipe on purpose: X-Omni starts from a released SigLIP2, which `xomni_siglip_vq`
loads from a local folder (`tokenizer.siglip_path`, checked when the job starts). What the VQ stage
reads from here is `<save_dir>/export/tokenizer` (tokenizer.init_from).
"""

from megatron_xomni.recipes import recipe
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.schedule import ScheduleConfig
from megatron_xomni.training.siglip_contrastive import (ContrastiveDataSection, ContrastiveEvalSection,
                                                        ContrastiveModelSection, SiglipContrastiveRunConfig)

# The tiny grid: 64 px world images with 8 px patches give 8x8 codes (4x4 = 16 tokens could not hold
# the world's colours, shapes and counts; measured in issue 11). The VQ and decoder recipes share it.
TINY_PATCH = {"patch_size": 8, "pos_grid": 8}


@recipe
def tiny_siglip_contrastive() -> SiglipContrastiveRunConfig:
    """The tiny ViT (tiny preset, patch 8) and a 2-block text tower trained with the SigLIP loss on the world
    captions: 600 steps of 128 images, AdamW 2e-3 with 50 warm-up steps and cosine decay."""
    return SiglipContrastiveRunConfig(
        name="tiny_siglip_contrastive", seed=0, steps=600, save_dir="runs/tiny/siglip_contrastive",
        save_interval=200, keep_last=2, log_interval=20,
        model=ContrastiveModelSection(preset="tiny", overrides=dict(TINY_PATCH), embed_dim=64, text_width=64,
                                      text_layers=2, text_heads=2),
        data=ContrastiveDataSection(corpus="runs/tiny/corpus", text_tokenizer="runs/tiny/text_tokenizer",
                                    batch_size=128, preprocess="tiny", max_text_tokens=64),
        optim=OptimConfig(lr=2e-3, min_lr=0.0, weight_decay=1e-4, adam_beta2=0.999, clip_grad=1.0),
        schedule=ScheduleConfig(style="cosine", warmup_steps=50),
        eval=ContrastiveEvalSection(world_samples=200, image_size=64),
    )
