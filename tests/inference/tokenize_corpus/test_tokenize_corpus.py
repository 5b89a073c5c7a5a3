"""Offline tokenization end to end (in-process): corpus -> token files -> megatron-core datasets, resume."""
from pathlib import Path

import numpy as np
import pytest

from megatron_xomni.inference.tokenize_corpus import output_prefix, tokenize_corpus

from megatron_xomni.inference import tokenize_corpus as pipeline
from tests.inference.tokenize_corpus.corpus_helpers import FILES, NUM_GOOD, TV, expected_documents, make_cfg, read_outputs


def test_token_files_hold_the_expected_documents(reference, text_tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, summary = reference
    expected = expected_documents(text_tok)
    for mode, docs in expected.items():
        assert len(docs) == NUM_GOOD
        tokens = IndexedDataset(output_prefix(out, mode))
        masks = IndexedDataset(output_prefix(out, mode) + "_lossmask")
        assert len(tokens) == len(masks) == len(docs)
        for n, (ids, mask) in enumerate(docs):
            assert tokens[n].tolist() == ids, (mode, n)
            assert masks[n].tolist() == mask, (mode, n)
        assert summary["modes"][mode]["documents"] == NUM_GOOD
        assert summary["modes"][mode]["target_tokens"] == sum(sum(m) for _, m in docs)
    rep = summary["skip_report"]
    assert rep["yielded"] == NUM_GOOD and rep["skipped"] == {"too_small": 1, "undecodable": 1}
    assert summary["eod_id"] == text_tok.eos_id and summary["text_vocab_size"] == TV
    assert not Path(f"{out}.parts").exists()


def test_gpt_dataset_serves_tokens_and_masks(reference, text_tok):
    from megatron_xomni.data.token_dataset import build_train_valid_datasets
    from megatron_xomni.data.token_dataset import DatasetSpec

    out, _ = reference
    docs = expected_documents(text_tok)["generation"]
    L = 24
    spec = DatasetSpec(blend=[output_prefix(out, "generation")], seq_length=L, eod_id=text_tok.eos_id, pad_id=-1,
                       split="100,0,0", cache_dir=str(out.parent / "cache"))
    train, _ = build_train_valid_datasets(spec, train_samples=20)
    ds = train.datasets[0] if hasattr(train, "datasets") else train
    for idx in range(len(train)):
        sample = train[idx]
        ds._query_document_sample_shuffle_indices(0)  # load the index arrays
        # GPTDataset: sample j is tokens [j*L, j*L+L+1) of the documents concatenated in document_index order
        order = np.asarray(ds.document_index)
        stream = np.concatenate([docs[d][0] for d in order])
        mstream = np.concatenate([docs[d][1] for d in order])
        j = int(ds.shuffle_index[idx])
        text, mask = stream[j * L : j * L + L + 1], mstream[j * L : j * L + L + 1]
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()
        assert sample["loss_mask"].tolist() == mask[1:].astype(float).tolist()


def test_interrupt_then_resume_is_identical(reference, corpus, text_tok_dir, tmp_path, monkeypatch):
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    real, calls = pipeline.tokenize_shard, []

    def crash_on_third(worker, shard, num_shards):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(worker, shard, num_shards)

    monkeypatch.setattr(pipeline, "tokenize_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(make_cfg(corpus, text_tok_dir, out))
    monkeypatch.setattr(pipeline, "tokenize_shard", real)
    parts = Path(f"{out}.parts")
    assert sorted(p.name for p in parts.glob("done-*.json")) == ["done-000000.json", "done-000001.json"]
    assert not any(Path(f"{out}{f}").exists() for f in FILES) and not Path(f"{out}.json").exists()
    # a half-written part of the interrupted shard is ignored and rewritten
    (parts / "generation-000002.tmp.bin").write_bytes(b"half a shard")
    with pytest.raises(ValueError, match="other inputs"):  # a rerun continues only the same run
        tokenize_corpus(make_cfg(corpus, text_tok_dir, out, mode="generation"))
    resumed = []
    monkeypatch.setattr(pipeline, "tokenize_shard", lambda w, s, n: resumed.append(s) or real(w, s, n))
    summary = tokenize_corpus(make_cfg(corpus, text_tok_dir, out))
    assert resumed == [2, 3]  # completed shards are not redone
    assert read_outputs(out) == read_outputs(ref_out)
    assert summary["skip_report"] == ref_summary["skip_report"]
    assert tokenize_corpus(make_cfg(corpus, text_tok_dir, out)) == summary  # complete: nothing to do
    assert resumed == [2, 3]
    with pytest.raises(ValueError, match="finished tokenization of other inputs"):
        tokenize_corpus(make_cfg(corpus, text_tok_dir, out, mode="generation"))


