"""SigLIP-VQ tokenizer recipes (X-Omni section 1): LLaVA-style training against a frozen text LLM.

    python -m megatron_xomni.train tiny_siglip_vq                                   # the tiny world, CPU
    torchrun --nproc-per-node 8 -m megatron_xomni.train xomni_siglip_vq data.corpus=/data/my_corpus

What downstream stages read is `<save_dir>/export/tokenizer`.
"""

from megatron_xomni.recipes import recipe
from megatron_xomni.recipes.siglip_contrastive import TINY_PATCH
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.schedule import ScheduleConfig
from megatron_xomni.training.siglip_vq_config import (CaptionDataConfig, CodebookSection, SiglipVQRunConfig,
                                                      TeacherSection, TinyAuxSection, TokenizerEvalConfig,
                                                      TokenizerSection)


@recipe
def tiny_siglip_vq() -> SiglipVQRunConfig:
    """The demo's image tokenizer: tiny preset at patch 8 (64 px -> 8x8 codes), a tiny teacher warmed up for
    300 steps on the world's captions (a frozen random LLM is a weak teacher), 1000 steps, eval on 32
    held-out images.

    Start it from the contrastive stage's encoder (X-Omni starts from a pretrained SigLIP2):
    `tokenizer.init_from=runs/tiny/siglip_contrastive/export/tokenizer` (the demo does). Measured on the tiny
    world, that start is neutral to slightly helpful (caption gap 118 % vs 99 %, probes within noise:
    colour 0.99 both, shape 0.82 vs 0.90, count 0.98 vs 0.99), so the encoder keeps the full lr.

    Tiny-preset choices, not X-Omni's (training/siglip_vq_aux.py): the pixel head on the adapter features
    (weight 4) with object-token weighting (alpha 4), and re-seeding only until step 800 of 1000."""
    return SiglipVQRunConfig(
        name="tiny_siglip_vq", seed=0, steps=1000, save_dir="runs/tiny/siglip_vq", save_interval=250,
        keep_last=2, log_interval=20,
        tokenizer=TokenizerSection(preset="tiny", projector="mlp", overrides=dict(TINY_PATCH)),
        teacher=TeacherSection(preset="tiny", warmup_steps=300, warmup_lr=2e-3, warmup_batch_size=32,
                               warmup_records=2000),
        optim=OptimConfig(lr=1e-3, min_lr=1e-3, weight_decay=0.0, adam_beta2=0.999, clip_grad=1.0),
        schedule=ScheduleConfig(style="constant", warmup_steps=20),
        data=CaptionDataConfig(corpus="runs/tiny/corpus", batch_size=16, text_tokenizer="runs/tiny/text_tokenizer",
                               preprocess="tiny", max_qa_pairs=8, max_text_tokens=128),
        codebook=CodebookSection(aux_loss_weight=1.0, reseed_every=50, reseed_min_count=1, reseed_until=800),
        eval=TokenizerEvalConfig(world_samples=32, image_size=64),
        aux=TinyAuxSection(pixel_weight=4.0, object_alpha=4.0, encoder_lr_mult=1.0),
    )


@recipe
def xomni_siglip_vq() -> SiglipVQRunConfig:
    """X-Omni's tokenizer: SigLIP2-giant (patch 16, 1536 wide, 40 blocks) from a local checkpoint, its
    24x24 position grid resized to 128x128 (2048 px), a 16384 x 2048 codebook with tau 2.0, commitment
    0.25 and 10 % skipped quantization (the `xomni` preset), trained on captioning/VQA against a frozen
    Qwen2.5-1.5B at X-Omni's image sizes (short side >= 384, long side <= 1152).

    Local inputs (checked when the job starts): `tokenizer.siglip_path` (e.g. a download of
    google/siglip2-giant-opt-patch16-384), `teacher.checkpoint` (Qwen2.5-1.5B converted with
    `xomni convert hf-to-megatron --hf Qwen2.5-1.5B/ --out ckpt/qwen2.5-1.5b --vision-layers 0 0`),
    `data.text_tokenizer` (xomni_text_tokenizer's output for that Qwen2.5 tokenizer) and `data.corpus`.
    Batch, steps, LR and the re-seeding period are not disclosed (?): LLaVA-1.5's batch of 256 with a
    lower, cosine-decayed LR because the ViT trains too; re-seeding stops at 80 % of the run.
    """
    steps = 20_000
    return SiglipVQRunConfig(
        name="xomni_siglip_vq", seed=1234, steps=steps, save_dir="runs/xomni/siglip_vq", save_interval=1000,
        keep_last=3, log_interval=10,
        tokenizer=TokenizerSection(preset="xomni", siglip_path="ckpt/siglip2-giant-opt-patch16-384",
                                   overrides={"gradient_checkpointing": True}, projector="mlp"),
        teacher=TeacherSection(checkpoint="ckpt/qwen2.5-1.5b", warmup_steps=0),
        optim=OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.0, adam_beta2=0.999, clip_grad=1.0),
        schedule=ScheduleConfig(style="cosine", warmup_steps=500),
        data=CaptionDataConfig(corpus="data/xomni/tokenizer_corpus", batch_size=256,
                               text_tokenizer="runs/xomni/text_tokenizer", preprocess="xomni", max_qa_pairs=8,
                               max_text_tokens=512),
        codebook=CodebookSection(aux_loss_weight=1.0, reseed_every=200, reseed_min_count=1,
                                 reseed_until=int(0.8 * steps)),
        eval=TokenizerEvalConfig(world_samples=0, corpus="data/xomni/tokenizer_eval", corpus_samples=256,
                                 batch_size=8),
    )
