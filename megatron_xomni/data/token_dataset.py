"""megatron-core GPTDataset with X-Omni's per-token loss masks, built through the blended builder.

`XOmniGPTDataset` reuses GPTDataset's document/sample/shuffle indices (packing documents into
fixed-length samples, optional per-document position and attention reset for SFT packing) and
reads the loss-mask file through the very same index query, so both stay aligned by construction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset


class XOmniGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.mask_dataset = IndexedDataset(dataset_path + "_lossmask", mmap=config.mmap_bin_files)
        if len(self.mask_dataset) != len(self.dataset) or not np.array_equal(
            self.mask_dataset.sequence_lengths, self.dataset.sequence_lengths
        ):
            raise ValueError(f"{dataset_path}_lossmask does not match {dataset_path}: re-run tokenization")

    def __getitem__(self, idx: Optional[int]):
        sample = super().__getitem__(idx)
        # Same spans, other file: swap the low-level dataset for one query.
        tokens_ds, self.dataset = self.dataset, self.mask_dataset
        try:
            mask, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        finally:
            self.dataset = tokens_ds
        target_mask = torch.from_numpy(mask.astype(np.float32)[1:]).clamp(min=0)
        sample["loss_mask"] = sample["loss_mask"] * target_mask
        return sample


class _Tokenizer:
    """The fields megatron-core's GPTDataset reads from a tokenizer."""

    vocab_size = None  # only used for per-dataset sequence caches, which we do not use

    def __init__(self, eod: int, pad: int):
        self.eod, self.pad = eod, pad
        # Part of the dataset cache key: samples built with other special ids must not be reused.
        self.unique_identifiers = {"class": "XOmniTokenIds", "eod": eod, "pad": pad}


@dataclass
class DatasetSpec:
    """Token data for one run."""

    blend: list
    """[prefix, ...] or [weight, prefix, weight, prefix, ...] (megatron-core blend syntax)."""
    seq_length: int
    eod_id: int
    pad_id: int
    split: str = "98,2,0"
    seed: int = 1234
    pack_documents: bool = False
    """SFT packing: positions restart and attention stays within each document."""
    cache_dir: Optional[str] = None


def _blend(spec_blend: list):
    if spec_blend and isinstance(spec_blend[0], (int, float)):
        weights = [float(w) for w in spec_blend[0::2]]
        return [str(p) for p in spec_blend[1::2]], weights
    return [str(p) for p in spec_blend], None


def _gpt_config(spec: DatasetSpec) -> GPTDatasetConfig:
    for prefix in _blend(spec.blend)[0]:
        for suffix in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx"):
            if not os.path.exists(prefix + suffix):
                raise FileNotFoundError(f"dataset file {prefix + suffix} is missing: run tokenization first")
    return GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=_blend(spec.blend),
        split=spec.split,
        tokenizer=_Tokenizer(spec.eod_id, spec.pad_id),
        reset_position_ids=spec.pack_documents,
        reset_attention_mask=spec.pack_documents,
        eod_mask_loss=False,
        create_attention_mask=spec.pack_documents,
        path_to_cache=spec.cache_dir,
        mmap_bin_files=True,
    )


def build_train_valid_datasets(spec: DatasetSpec, train_samples: int, valid_samples: int = 0):
    """Build (train, valid) datasets with megatron-core's BlendedMegatronDatasetBuilder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    config = _gpt_config(spec)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        XOmniGPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


class SampleStream:
    """An endless, deterministic sample order over a blend, independent of how long the run is.

    megatron-core sizes its indices by the number of samples requested (steps x global batch),
    so a longer run reshuffles every sample. Here each blended dataset is built for exactly one epoch
    (its order depends only on data, split and seed) and samples are drawn from the blend by
    megatron-core's own greedy blending (`build_blending_indices`, prefix-stable: the first k choices
    do not depend on the total). A dataset's epoch e > 0 is a seeded permutation of epoch 0. So
    sample i is the same for every run length, and resuming a run with a larger `steps` continues the
    same stream.
    """

    def __init__(self, datasets: list, weights: list[float], seed: int):
        if not datasets or any(len(d) == 0 for d in datasets):
            raise ValueError("a dataset of the blend has no samples for this split: check data.split and the files")
        total = float(sum(weights))
        self.datasets = datasets
        self.weights = np.asarray([w / total for w in weights], dtype=np.float64)
        self.seed = seed
        self._dataset_index = np.zeros(0, dtype=np.int16)
        self._sample_index = np.zeros(0, dtype=np.int64)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _ensure(self, size: int) -> None:
        if size <= len(self._dataset_index):
            return
        from megatron.core.datasets import helpers

        n = max(size, 2 * len(self._dataset_index), 1024)
        dataset_index = np.zeros(n, dtype=np.int16)
        sample_index = np.zeros(n, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, sample_index, self.weights, len(self.datasets), n, False)
        self._dataset_index, self._sample_index = dataset_index, sample_index

    def _local(self, d: int, j: int) -> int:
        n = len(self.datasets[d])
        epoch, k = divmod(j, n)
        if epoch == 0:
            return k
        key = (d, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.RandomState((self.seed * 1_000_003 + d * 10_007 + epoch) % 2**32).permutation(n)
        return int(self._perms[key][k])

    def __getitem__(self, i: int) -> dict:
        self._ensure(i + 1)
        d = int(self._dataset_index[i])
        return self.datasets[d][self._local(d, int(self._sample_index[i]))]


def build_sample_streams(spec: DatasetSpec) -> tuple[SampleStream, Optional[SampleStream]]:
    """(train, valid) SampleStreams of a blend; valid is None when the split gives it no documents."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    prefixes, weights = _blend(spec.blend)
    weights = weights or [1.0] * len(prefixes)
    train, valid = [], []
    for prefix in prefixes:
        one = DatasetSpec(**{**spec.__dict__, "blend": [prefix]})
        t, v, _ = BlendedMegatronDatasetBuilder(
            XOmniGPTDataset, [None, None, None], lambda: True, _gpt_config(one)).build()
        train.append(t)
        valid.append(v)
    train_stream = SampleStream(train, weights, spec.seed)
    has_valid = all(v is not None and len(v) > 0 for v in valid)
    return train_stream, SampleStream(valid, weights, spec.seed + 1) if has_valid else None
