"""Offline tokenization: X-Omni sequence format and the corpus -> token files pipeline.

    from megatron_xomni.tokenize import SequenceFormat, build_generation, build_understanding, parse_image_sequence
    from megatron_xomni.tokenize import TokenizeConfig, tokenize_corpus
"""
from megatron_xomni.tokenize.format import (
    Document,
    FormatError,
    ParsedImage,
    SequenceFormat,
    build_generation,
    build_understanding,
    image_block_ids,
    parse_image_sequence,
    qa_turns,
)
from megatron_xomni.tokenize.pipeline import TokenizeConfig, load_image_tokenizer, output_prefix, summary_path, tokenize_corpus

__all__ = [
    "Document",
    "FormatError",
    "ParsedImage",
    "SequenceFormat",
    "TokenizeConfig",
    "build_generation",
    "build_understanding",
    "image_block_ids",
    "load_image_tokenizer",
    "output_prefix",
    "parse_image_sequence",
    "qa_turns",
    "summary_path",
    "tokenize_corpus",
]
