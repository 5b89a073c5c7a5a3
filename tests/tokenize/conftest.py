import pytest

from megatron_xomni.text import XOmniTextTokenizer, train_sentencepiece, world_texts


@pytest.fixture(scope="session")
def text_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_tok")
    model = train_sentencepiece(world_texts(300), d / "train" / "spm", vocab_size=512)
    return XOmniTextTokenizer.from_sentencepiece(model).save(d / "tok")


@pytest.fixture(scope="session")
def text_tok(text_tok_dir):
    return XOmniTextTokenizer.load(text_tok_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from tests.tokenize.corpus_helpers import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def reference(corpus, text_tok_dir, tmp_path_factory):
    """An uninterrupted one-process run: (out_prefix, summary)."""
    from megatron_xomni.tokenize import tokenize_corpus
    from tests.tokenize.corpus_helpers import make_cfg

    out = tmp_path_factory.mktemp("ref") / "tok"
    return out, tokenize_corpus(make_cfg(corpus, text_tok_dir, out))
