"""The text tokenizer stage (`python -m megatron_xomni.train tiny_text_tokenizer`): each source builds the
tokenizer the library calls would, the folder is published once, reruns and refusals, one-line errors.
(SIGKILL before publishing + byte-identical rerun: test_recipe_matrix.py.)"""

import json

from megatron_xomni.recipes import load_recipe
from megatron_xomni.train import main, run_config


def _build(tmp_path, *overrides):
    cfg = load_recipe("tiny_text_tokenizer", [f"save_dir={tmp_path / 'tok'}", *overrides])
    assert run_config(cfg) == 0
    return cfg


def test_world_source_is_sentencepiece_on_the_world_texts(tmp_path):
    """The folder holds exactly the model train_sentencepiece makes from world_texts (built here directly)."""
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts

    _build(tmp_path, "world_samples=300", "seed=3")
    want = train_sentencepiece(world_texts(300, 3), tmp_path / "direct" / "spm", 512)
    assert (tmp_path / "tok" / "spm.model").read_bytes() == want.read_bytes()
    tok = XOmniTextTokenizer.load(tmp_path / "tok")
    assert tok.vocab_size <= 512 and tok.encode("<SOM>") == [tok.som_id]
    assert json.loads((tmp_path / "tok" / "stage.json").read_text())["world_samples"] == 300


def test_corpus_source_reads_captions_and_qa_without_images(tmp_path):
    from megatron_xomni.data import write_world_corpus
    from megatron_xomni.data.caption_batches import corpus_caption_texts
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.world import sample_world

    write_world_corpus(tmp_path / "corpus", 40, seed=5, samples_per_shard=16)
    texts = corpus_caption_texts(tmp_path / "corpus")
    want = []
    for i in range(40):  # what write_world_corpus stored: sample i's caption, then its QA pairs
        s = sample_world(i, seed=5)
        want += [s.caption] + [f"{q} {a}" for q, a in s.qa]
    assert texts == want
    _build(tmp_path, "source=corpus", f"corpus={tmp_path / 'corpus'}", "vocab_size=400", "text_vocab_size=512")
    tok = XOmniTextTokenizer.load(tmp_path / "tok")
    assert tok.decode(tok.encode(want[0])) == want[0]


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path, capsys):
    _build(tmp_path, "world_samples=200")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tok").iterdir()}
    _build(tmp_path, "world_samples=200", "name=again")  # the name is not a setting of the output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tok").iterdir()} == before
    capsys.readouterr()
    assert main(["tiny_text_tokenizer", f"save_dir={tmp_path / 'tok'}", "world_samples=300"]) == 2
    err = capsys.readouterr().err
    assert "already holds a text tokenizer (other settings)" in err


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    cases = [(["source=books"], "use one of world, corpus, text, hf"), (["source=hf"], "needs hf_path=..."),
             (["source=hf", f"hf_path={tmp_path}/none"], "is not a folder"),
             (["--vocab-size", "300"], "write vocab_size=VALUE"), (["out_dir=x"], "`out_dir` is now `save_dir`"),
             (["num_samples=10"], "`num_samples` is now `world_samples`"),
             (["vocab_size=100"], "vocab_size=100 is too small"),
             (["text_vocab_size=256"], "is smaller than the text tokenizer's vocabulary")]
    for extra, message in cases:
        assert main(["tiny_text_tokenizer", f"save_dir={tmp_path / 'tok'}", "world_samples=100", *extra]) == 2, extra
        err = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("megatron-xomni: ")]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
    assert not (tmp_path / "tok").exists()

