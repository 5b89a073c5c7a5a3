"""Text tokenizer recipes: `python -m megatron_xomni.train tiny_text_tokenizer` (one process, no torchrun)."""

from megatron_xomni.recipes import recipe
from megatron_xomni.training.text_tokenizer import TextTokenizerRunConfig


@recipe
def tiny_text_tokenizer() -> TextTokenizerRunConfig:
    """sentencepiece BPE on 2000 built-in world images' captions and QA, 512 ids: exactly the tiny model's
    text table (the demo's text tokenizer)."""
    return TextTokenizerRunConfig(name="tiny_text_tokenizer", seed=0, save_dir="runs/tiny/text_tokenizer",
                                  source="world", world_samples=2000, vocab_size=512, text_vocab_size=512)


@recipe
def xomni_text_tokenizer() -> TextTokenizerRunConfig:
    """X-Omni's text tokenizer: Qwen2.5's (a local copy of its tokenizer files, e.g. from Qwen2.5-7B/) plus
    `<SOM>`, `<EOM>`, `<IMAGE>`; it fits the 152,064-row text table of Qwen2.5-7B (and 1.5B's 151,936)."""
    return TextTokenizerRunConfig(name="xomni_text_tokenizer", save_dir="runs/xomni/text_tokenizer", source="hf",
                                  hf_path="ckpt/Qwen2.5-7B", text_vocab_size=151936)
