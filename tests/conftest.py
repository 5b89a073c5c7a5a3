"""Session fixtures shared by several test folders."""
import pytest

from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts
from tests.multirank import shutdown_helpers


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The session's forkserver and resource tracker end with it (checked by test_hygiene.py)."""
    yield
    shutdown_helpers()


@pytest.fixture(scope="session")
def text_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_tok")
    model = train_sentencepiece(world_texts(300), d / "train" / "spm", vocab_size=512)
    return XOmniTextTokenizer.from_sentencepiece(model).save(d / "tok")


@pytest.fixture(scope="session")
def text_tok(text_tok_dir):
    return XOmniTextTokenizer.load(text_tok_dir)
