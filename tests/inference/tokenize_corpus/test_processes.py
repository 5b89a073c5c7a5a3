"""Offline tokenization with worker processes, and the stage's command killed with SIGKILL then resumed."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_xomni.inference.tokenize_corpus import tokenize_corpus
from tests.inference.tokenize_corpus.corpus_helpers import TV, make_cfg, read_outputs

REPO = Path(__file__).resolve().parents[3]


def test_two_workers_give_identical_files(reference, corpus, text_tok_dir, tmp_path):
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    summary = tokenize_corpus(make_cfg(corpus, text_tok_dir, out, workers=2))
    assert read_outputs(out) == read_outputs(ref_out)
    assert summary["modes"] == ref_summary["modes"] and summary["skip_report"] == ref_summary["skip_report"]


@pytest.mark.parametrize("kill_at", ["after_step:1", "in_save:4"])
def test_command_killed_mid_run_then_resumed(reference, corpus, text_tok_dir, tmp_path, kill_at):
    """`python -m megatron_xomni.train tiny_tokenize ... debug_kill=...` SIGKILLs itself (no cleanup runs)
    after its first shard is published, or in the middle of the merge (every shard done, one final file
    written, no summary); the same command without the kill then gives the uninterrupted run's files."""
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "megatron_xomni.train", "tiny_tokenize", f"corpus={corpus}", f"save_dir={tmp_path}",
           "prefix=tok", f"text_tokenizer={text_tok_dir}", "image_tokenizer=tiny", "seed=0", f"text_vocab_size={TV}",
           "batch_size=4", "progress=false", "workers=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd + [f"debug_kill={kill_at}"], env=env, start_new_session=True, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    parts = Path(f"{out}.parts")
    done = sorted(p.name for p in parts.glob("done-*.json"))
    assert not Path(f"{out}.json").exists()  # the summary marks a complete run
    if kill_at.startswith("in_save"):
        assert len(done) == 4 and Path(f"{out}_generation.bin").exists()
    else:
        assert done == ["done-000000.json"] and not Path(f"{out}_generation.bin").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_outputs(out) == read_outputs(ref_out)
    assert not parts.exists()


def test_bad_settings_are_one_line_errors_with_exit_2(corpus, text_tok_dir, tmp_path, capsys):
    from megatron_xomni.train import main

    base = ["tiny_tokenize", f"corpus={corpus}", f"save_dir={tmp_path}", f"text_tokenizer={text_tok_dir}",
            "image_tokenizer=tiny"]
    cases = [(["out_prefix=x"], "`out_prefix` is now `save_dir`"), (["--resume"], "`--resume` is gone"),
             (["--out", "x"], "write save_dir=VALUE"), (["mode=all"], "mode must be generation, understanding or both"),
             (["workers=0"], "workers=0 must be >= 1"), (["corpus=/nonexistent"], "is not a corpus folder"),
             (["image_tokenizer=/nonexistent"], "neither a folder nor a preset name")]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("megatron-xomni: ")]  # TE notice
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
    assert not any(tmp_path.iterdir())  # nothing was written
