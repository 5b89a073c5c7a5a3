"""Corpus tokenization recipes: `python -m megatron_xomni.train tiny_tokenize` (one process that starts
`workers` worker processes itself; no torchrun). Outputs `<save_dir>/<prefix>_{generation,understanding}`
for the AR recipes' data.blend and `<save_dir>/<prefix>.json` (blend, eod_id, counts, skip report)."""

from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig
from megatron_xomni.recipes import recipe


@recipe
def tiny_tokenize() -> TokenizeRunConfig:
    """The demo's tokenization: the tiny world corpus through the tiny tokenizers, both modes, 64 px rules."""
    return TokenizeRunConfig(
        name="tiny_tokenize", save_dir="runs/tiny/tokens", prefix="world", corpus="runs/tiny/corpus",
        text_tokenizer="runs/tiny/text_tokenizer", image_tokenizer="runs/tiny/siglip_vq/export/tokenizer",
        mode="both", workers=1, text_vocab_size=512, preprocess="tiny",
        # 64 px images: the tiny size rules (X-Omni's would reject them as too small)
    )


@recipe
def xomni_tokenize() -> TokenizeRunConfig:
    """X-Omni pre-training data: a corpus through the trained SigLIP-VQ tokenizer (X-Omni's image size rules:
    short side >= 384, long side <= 1152, multiples of 16) and Qwen2.5's text tokenizer; image code k gets id
    152064 + k (Qwen2.5-7B's padded text table). 8 workers, one per GPU."""
    return TokenizeRunConfig(
        name="xomni_tokenize", save_dir="data/xomni", prefix="pretrain", corpus="data/xomni/corpus",
        text_tokenizer="runs/xomni/text_tokenizer", image_tokenizer="runs/xomni/siglip_vq/export/tokenizer",
        mode="both", workers=8, device="cuda", batch_size=32, text_vocab_size=152064, preprocess="xomni",
    )
