"""Offline tokenization with worker processes, and a CLI run killed with SIGKILL then resumed."""
import os
import signal
import subprocess
import sys
import time
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


def test_cli_killed_mid_run_then_resumed(reference, corpus, text_tok_dir, tmp_path):
    """SIGKILL the CLI after its first shard is published (no cleanup runs), then resume."""
    ref_out, ref_summary = reference
    out = tmp_path / "tok"
    cmd = [sys.executable, str(REPO / "tools" / "tokenize_corpus.py"), str(corpus), str(out), "--text-tokenizer",
           str(text_tok_dir), "--image-tokenizer", "tiny", "--text-vocab-size", str(TV), "--batch-size", "4",
           "--quiet", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "cli.log"  # a file, not a pipe: a full pipe would stall the child
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    parts = Path(f"{out}.parts")
    deadline = time.time() + 240
    while not list(parts.glob("done-*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None and not Path(f"{out}.json").exists():
        pytest.fail(f"CLI failed: {log.read_text()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if Path(f"{out}.json").exists():
        pytest.skip("the run finished before it could be killed")
    done = sorted(p.name for p in parts.glob("done-*.json"))
    # Killed before the run completed: after some shards, or (on a fast machine) after all shards
    # but during the merge; resume must give identical outputs from either point.
    assert done
    assert not Path(f"{out}_generation.bin").exists()
    summary = tokenize_corpus(make_cfg(corpus, text_tok_dir, out, resume=True))
    assert read_outputs(out) == read_outputs(ref_out)
    assert summary["skip_report"] == ref_summary["skip_report"]
