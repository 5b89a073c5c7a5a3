"""Offline tokenization with worker processes, and a CLI run killed with SIGKILL then resumed."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_xomni.inference.tokenize_corpus import KILL_ENV, tokenize_corpus
from tests.inference.tokenize_corpus.corpus_helpers import TV, make_cfg, read_outputs

REPO = Path(__file__).resolve().parents[3]


def test_two_workers_give_identical_files(reference, corpus, text_tok_dir, tmp_path):
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    summary = tokenize_corpus(make_cfg(corpus, text_tok_dir, out, workers=2))
    assert read_outputs(out) == read_outputs(ref_out)
    assert summary["modes"] == ref_summary["modes"] and summary["skip_report"] == ref_summary["skip_report"]


@pytest.mark.parametrize("kill_at", ["shards=1", "merge"])
def test_cli_killed_mid_run_then_resumed(reference, corpus, text_tok_dir, tmp_path, kill_at):
    """The CLI SIGKILLs itself (no cleanup runs) after its first shard is published, or in the
    middle of the merge (every shard done, one final file written, no summary); resume must
    then give the uninterrupted run's files."""
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    cmd = [sys.executable, str(REPO / "tools" / "tokenize_corpus.py"), str(corpus), str(out), "--text-tokenizer",
           str(text_tok_dir), "--image-tokenizer", "tiny", "--text-vocab-size", str(TV), "--batch-size", "4",
           "--quiet", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), KILL_ENV: kill_at}
    proc = subprocess.run(cmd, env=env, start_new_session=True, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    parts = Path(f"{out}.parts")
    done = sorted(p.name for p in parts.glob("done-*.json"))
    assert not Path(f"{out}.json").exists()  # the summary marks a complete run
    if kill_at == "merge":
        assert len(done) == 4 and Path(f"{out}_generation.bin").exists()
    else:
        assert done == ["done-000000.json"] and not Path(f"{out}_generation.bin").exists()
    summary = tokenize_corpus(make_cfg(corpus, text_tok_dir, out, resume=True))
    assert read_outputs(out) == read_outputs(ref_out)
    assert summary["skip_report"] == ref_summary["skip_report"]
    assert not parts.exists()
