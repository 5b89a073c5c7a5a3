"""Text tokenizer of the AR model (sentencepiece or local HF files) with X-Omni's multimodal specials."""
from megatron_xomni.text.tokenizer import (
    EOM,
    IMAGE,
    SOM,
    SPECIAL_TOKENS,
    XOmniTextTokenizer,
    image_token_id,
    mm_token_string,
    train_sentencepiece,
    world_texts,
)

__all__ = [
    "EOM",
    "IMAGE",
    "SOM",
    "SPECIAL_TOKENS",
    "XOmniTextTokenizer",
    "image_token_id",
    "mm_token_string",
    "train_sentencepiece",
    "world_texts",
]
