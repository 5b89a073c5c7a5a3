"""Synthetic token files (random text/image documents) for tests and benchmarks."""

from __future__ import annotations

import numpy as np

from megatron_xomni.data.token_files import TokenFileWriter


def write_synthetic_tokens(prefix, num_docs: int, text_vocab: int, image_vocab: int, seed: int = 0,
                           eod_id: int = 1, image_grid: int = 16, caption_len=(4, 12)) -> str:
    """Generation-style documents: caption text, image codes (supervised), EOD."""
    rng = np.random.default_rng(seed)
    writer = TokenFileWriter(prefix)
    for _ in range(num_docs):
        caption = rng.integers(3, text_vocab, rng.integers(*caption_len))
        # Codes with structure (a noisy ramp) so a model can actually learn something.
        start = rng.integers(0, image_vocab)
        codes = (start + np.arange(image_grid) * 3 + rng.integers(0, 2, image_grid)) % image_vocab
        ids = np.concatenate([caption, text_vocab + codes, [eod_id]])
        mask = np.concatenate([np.zeros(len(caption)), np.ones(image_grid + 1)])
        writer.add_document(ids, mask)
    writer.finalize()
    return str(prefix)
