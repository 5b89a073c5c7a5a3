"""Caption/QA data for LLaVA-style tokenizer training: texts, padded ids, same-size image batches.

A sample's text is its caption followed by up to `max_qa_pairs` "question answer." pairs from
meta["qa"] (what `write_world_corpus` stores); EOS ends it. Images come from a WebDataset corpus via
megatron_xomni.data.CorpusDataset (deterministic split over ranks), preprocessed with the tiny rules.
"""
from __future__ import annotations

from typing import Iterator

import torch


def sample_text(caption: str, meta: dict | None, max_qa_pairs: int) -> str:
    """Caption followed by up to `max_qa_pairs` "question answer." pairs from meta["qa"]."""
    parts = [caption.strip()]
    qa = (meta or {}).get("qa") or []
    for q, a in qa[:max_qa_pairs]:
        parts.append(f"{q} {a}.")
    return " ".join(parts)


def encode_texts(text_tok, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> right-padded ids [B, T] (EOS appended, cut to max_tokens) and a float mask [B, T]."""
    rows = [(text_tok.encode(t)[: max_tokens - 1] + [text_tok.eos_id]) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0
    return ids, mask


class CaptionBatches:
    """Endless (pixels [b, 3, H, W], texts) batches of this rank's share of a corpus.

    Images of one batch share a size (samples wait in per-size buckets); epochs repeat the corpus
    (shard order reshuffled per epoch when there are several shards); `skip(n)` fast-forwards a
    resumed run to the same position.
    """

    def __init__(self, corpus, per_rank_batch: int, max_qa_pairs: int, preprocess_cfg=None, seed: int = 0) -> None:
        from megatron_xomni.data import CorpusDataset, ImagePreprocessConfig

        self.dataset = CorpusDataset(corpus, preprocess_cfg or ImagePreprocessConfig.tiny(),
                                     decoder="pillow", shuffle_shards=True, seed=seed)
        self.per_rank_batch = per_rank_batch
        self.max_qa_pairs = max_qa_pairs
        self._it = self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            buckets: dict[tuple, list] = {}
            produced = 0
            for sample in self.dataset:
                key = tuple(sample["pixels"].shape)
                bucket = buckets.setdefault(key, [])
                bucket.append(sample)
                if len(bucket) == self.per_rank_batch:
                    buckets[key] = []
                    produced += 1
                    yield (torch.stack([s["pixels"] for s in bucket]),
                           [sample_text(s["caption"], s["meta"], self.max_qa_pairs) for s in bucket])
            if produced == 0:
                raise ValueError(f"this rank's share of the corpus holds fewer than {self.per_rank_batch} same-size "
                                 "images: write a larger corpus or lower the batch size")
            epoch += 1

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        return next(self._it)

    def __iter__(self):
        return self

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self._it)


def corpus_texts(corpus, num_records: int, max_qa_pairs: int, preprocess_cfg=None) -> list[str]:
    """Caption + QA texts of the first `num_records` usable records (the LLM warm-up set)."""
    from megatron_xomni.data import CorpusReader, ImagePreprocessConfig

    texts = []
    for sample in CorpusReader(corpus, preprocess_cfg or ImagePreprocessConfig.tiny(), decoder="pillow"):
        texts.append(sample_text(sample["caption"], sample["meta"], max_qa_pairs))
        if len(texts) >= num_records:
            break
    if not texts:
        raise ValueError(f"corpus {corpus} yielded no records for the LLM warm-up")
    return texts


def corpus_caption_texts(corpus, max_records: int = 0, max_qa_pairs: int = 8) -> list[str]:
    """Caption and "question answer" texts of a corpus' records, read from the tar fields without decoding
    any image (what a text tokenizer trains on); max_records 0 reads every record."""
    import json

    from megatron_xomni.data.corpus import CAPTION_EXT, META_EXT
    from megatron_xomni.data.reader import _resolve_shards, iter_tar_records

    texts, records = [], 0
    for shard in _resolve_shards(corpus)[0]:
        for _, _, parts, _ in iter_tar_records(shard):
            caption = parts.get(CAPTION_EXT, b"").decode("utf-8", errors="ignore").strip()
            if not caption:
                continue
            try:
                meta = json.loads(parts[META_EXT]) if META_EXT in parts else {}
            except ValueError:
                meta = {}
            qa = meta.get("qa") if isinstance(meta, dict) else None
            texts.append(caption)
            texts.extend(f"{q} {a}" for q, a in (qa or [])[:max_qa_pairs])
            records += 1
            if max_records and records >= max_records:
                return texts
    if not texts:
        raise ValueError(f"corpus {corpus} holds no captions")
    return texts


def corpus_eval_set(corpus, n: int, preprocess_cfg=None) -> list[tuple[torch.Tensor, str, dict]]:
    """The first `n` usable records of a (held-out) corpus as (pixels [3, H, W], caption, meta) triples."""
    from megatron_xomni.data import CorpusReader, ImagePreprocessConfig

    out = []
    for sample in CorpusReader(corpus, preprocess_cfg or ImagePreprocessConfig.tiny(), decoder="pillow"):
        if len(out) >= n:
            break
        out.append((sample["pixels"], sample["caption"], sample["meta"] or {}))
    return out


def __getattr__(name: str):
    # world_eval_set lives with the world's other data adapters (data/world_source.py)
    if name == "world_eval_set":
        from megatron_xomni.data.world_source import world_eval_set

        return world_eval_set
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
