"""On-disk format of tokenized data: two megatron-core IndexedDatasets with identical documents.

    <prefix>.bin / .idx               token ids (int32): text ids, and image code k as V + k
    <prefix>_lossmask.bin / .idx      per-token loss mask (uint8): 1 = supervise predicting this token

The mask is stored per *token* (is this token a training target?) so that packing and the
GPT sample index of megatron-core can slice both files with the same spans. X-Omni's rule:
generation samples supervise image tokens (and <EOM>), understanding samples text answers.
Writes go to `.tmp` files renamed on `finalize()`, so a crash never leaves a readable half file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def token_file_paths(prefix) -> dict[str, Path]:
    prefix = str(prefix)
    return {
        "tokens_bin": Path(prefix + ".bin"), "tokens_idx": Path(prefix + ".idx"),
        "mask_bin": Path(prefix + "_lossmask.bin"), "mask_idx": Path(prefix + "_lossmask.idx"),
    }


class TokenFileWriter:
    """Append documents (token ids + loss mask); `finalize()` publishes the four files atomically."""

    def __init__(self, prefix):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_tokens = self.prefix + ".tmp"
        self._tmp_mask = self.prefix + "_lossmask.tmp"
        self.tokens = IndexedDatasetBuilder(self._tmp_tokens + ".bin", dtype=np.int32)
        self.mask = IndexedDatasetBuilder(self._tmp_mask + ".bin", dtype=np.uint8)
        self.documents = 0

    def add_document(self, token_ids, loss_mask) -> None:
        import torch

        ids = np.asarray(token_ids, dtype=np.int32)
        mask = np.asarray(loss_mask, dtype=np.uint8)
        if ids.shape != mask.shape or ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"document tokens {ids.shape} and loss mask {mask.shape} must be equal non-empty 1-D arrays")
        self.tokens.add_item(torch.from_numpy(ids))
        self.tokens.end_document()
        self.mask.add_item(torch.from_numpy(mask))
        self.mask.end_document()
        self.documents += 1

    def finalize(self) -> None:
        self.tokens.finalize(self._tmp_tokens + ".idx")
        self.mask.finalize(self._tmp_mask + ".idx")
        paths = token_file_paths(self.prefix)
        for tmp, final in [(self._tmp_tokens + ".bin", paths["tokens_bin"]), (self._tmp_tokens + ".idx", paths["tokens_idx"]),
                           (self._tmp_mask + ".bin", paths["mask_bin"]), (self._tmp_mask + ".idx", paths["mask_idx"])]:
            os.replace(tmp, final)
