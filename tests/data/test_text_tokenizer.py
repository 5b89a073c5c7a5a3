"""XOmniTextTokenizer: sentencepiece training, special tokens, round trips, save/load, the HF path."""
import json

import pytest

from megatron_xomni.data.text_tokenizer import SPECIAL_TOKENS, XOmniTextTokenizer, train_sentencepiece, world_texts


@pytest.fixture(scope="module")
def texts():
    return world_texts(300)


@pytest.fixture(scope="module")
def spm_tok(texts, tmp_path_factory):
    model = train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "spm", vocab_size=512)
    return XOmniTextTokenizer.from_sentencepiece(model)


def test_special_tokens_are_single_ids(spm_tok):
    ids = [spm_tok.som_id, spm_tok.eom_id, spm_tok.image_id]
    assert len(set(ids + [spm_tok.eos_id])) == 4
    for tok, i in zip(SPECIAL_TOKENS, ids):
        assert spm_tok.encode(tok) == [i]
    # inside text they are matched whole, never split into '<', 'S', ...
    ids = spm_tok.encode("a red circle<SOM>4 4<IMAGE>")
    assert ids[-1] == spm_tok.image_id and spm_tok.som_id in ids
    assert ids[: ids.index(spm_tok.som_id)] == spm_tok.encode("a red circle")
    assert spm_tok.vocab_size <= 512


def test_digits_split_and_grid_header_is_plain_text(spm_tok):
    sp = spm_tok._backend
    for text in ("4 4", "72 72", "16 128"):
        pieces = [sp.id_to_piece(i) for i in spm_tok.encode(text)]
        # every piece is a single digit or the space marker: numbers never merge into multi-digit pieces
        assert all(p in list("0123456789") + ["▁"] for p in pieces), pieces
        assert "".join(pieces).replace("▁", " ") == text
    # segments concatenate: encoding "4 4" equals encoding its characters one by one
    assert spm_tok.encode("4 4") == spm_tok.encode("4") + spm_tok.encode(" ") + spm_tok.encode("4")


def test_round_trip_world_and_unseen_text(spm_tok, texts):
    for t in texts[:200] + ["Zebra ü 日本 !?", "  two  spaces ", "\n"]:
        assert spm_tok.decode(spm_tok.encode(t)) == t
    assert spm_tok._backend.unk_id() not in spm_tok.encode("Zebra ü 日本")  # byte fallback, no <unk>


def test_decode_renders_image_ids_and_eos(spm_tok):
    tv = 512
    ids = spm_tok.encode("a cat") + [spm_tok.som_id] + spm_tok.encode("1 2") + [spm_tok.image_id, tv + 7, tv + 0,
                                                                                   spm_tok.eom_id, spm_tok.eos_id]
    assert spm_tok.decode(ids, tv) == "a cat<SOM>1 2<IMAGE><MM-Token-7><MM-Token-0><EOM></s>"
    assert spm_tok.image_token_id(5, tv) == 517
    if spm_tok.vocab_size < tv:
        with pytest.raises(ValueError, match="padding row"):
            spm_tok.decode([tv - 1], tv)


def test_text_vocab_check(spm_tok):
    spm_tok.check_text_vocab(spm_tok.vocab_size)
    with pytest.raises(ValueError, match="text_vocab_size=100 is smaller"):
        spm_tok.check_text_vocab(100)


def test_training_is_deterministic_and_save_load(texts, spm_tok, tmp_path):
    a = train_sentencepiece(texts, tmp_path / "a", 512).read_bytes()
    b = train_sentencepiece(texts, tmp_path / "b", 512).read_bytes()
    assert a == b
    spm_tok.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "text_tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece"
    loaded = XOmniTextTokenizer.load(tmp_path / "saved")
    assert loaded.special_ids == spm_tok.special_ids and loaded.vocab_size == spm_tok.vocab_size
    assert loaded.encode(texts[3]) == spm_tok.encode(texts[3])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="holds no text tokenizer"):
        XOmniTextTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["abc"], tmp_path / "x", vocab_size=100)


def test_hf_tokenizer_folder_gets_special_tokens(texts, tmp_path):
    """A byte-level BPE HF tokenizer (the Qwen2.5 kind) without the specials: they are registered."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    tok = XOmniTextTokenizer.load(tmp_path / "hf")
    assert tok.kind == "hf"
    assert tok.eos_id == bpe.token_to_id("<|endoftext|>")
    base = bpe.get_vocab_size()
    assert sorted([tok.som_id, tok.eom_id, tok.image_id]) == [base, base + 1, base + 2]
    assert tok.vocab_size == base + 3
    for t in texts[:50]:
        ids = tok.encode(t)
        assert ids == bpe.encode(t).ids  # plain text tokenizes exactly as the underlying BPE
        assert tok.decode(ids) == t
    assert tok.encode("x<SOM>4 4<IMAGE>")[-1] == tok.image_id
    tok.save(tmp_path / "saved")
    again = XOmniTextTokenizer.load(tmp_path / "saved")
    assert again.special_ids == tok.special_ids
