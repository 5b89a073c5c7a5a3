import pytest



@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from tests.inference.tokenize_corpus.corpus_helpers import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference(corpus, text_tok_dir, tmp_path_factory):
    """An uninterrupted one-process run: (out_prefix, summary)."""
    from megatron_xomni.inference.tokenize_corpus import tokenize_corpus
    from tests.inference.tokenize_corpus.corpus_helpers import make_cfg

    out = tmp_path_factory.mktemp("ref") / "tok"
    return out, tokenize_corpus(make_cfg(corpus, text_tok_dir, out))
