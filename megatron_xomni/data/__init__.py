"""Image-text data: X-Omni preprocessing, WebDataset corpora (write / read), decoding, skip accounting.

    from megatron_xomni.data import ImagePreprocessConfig, preprocess, target_size
    from megatron_xomni.data import write_world_corpus, CorpusReader, CorpusDataset, SkipReport
    from megatron_xomni.data import CorpusSource, BatchShape, image_text_source    # records by index, batches by step
    from megatron_xomni.data import PromptConfig, make_prompt_source                # prompt sources
"""

from megatron_xomni.data.corpus import (
    CorpusManifest,
    CorpusWriter,
    ShardInfo,
    write_corpus,
    write_folder_corpus,
    write_jsonl_corpus,
)
from megatron_xomni.data.corpus_source import BatchShape, CorpusSource, ImageTextSource, image_text_source
from megatron_xomni.data.decode import DaliDecoder, DecodeFailed, PillowDecoder, dali_available, make_decoder
from megatron_xomni.data.preprocess import ImagePreprocessConfig, ImageRejected, check_size, preprocess, target_size
from megatron_xomni.data.prompts import PromptConfig, PromptSource, make_prompt_source
from megatron_xomni.data.reader import CorpusDataset, CorpusReader, iter_tar_records
from megatron_xomni.data.world_source import write_world_corpus
from megatron_xomni.data.report import SkipReason, SkipReport

__all__ = [
    "BatchShape",
    "CorpusDataset",
    "CorpusManifest",
    "CorpusReader",
    "CorpusSource",
    "CorpusWriter",
    "DaliDecoder",
    "DecodeFailed",
    "ImagePreprocessConfig",
    "ImageTextSource",
    "ImageRejected",
    "PillowDecoder",
    "PromptConfig",
    "PromptSource",
    "ShardInfo",
    "SkipReason",
    "SkipReport",
    "check_size",
    "dali_available",
    "image_text_source",
    "iter_tar_records",
    "make_prompt_source",
    "make_decoder",
    "preprocess",
    "target_size",
    "write_corpus",
    "write_folder_corpus",
    "write_jsonl_corpus",
    "write_world_corpus",
]
