"""Fixtures shared by the inference and CLI tests.

`bundle`: the tiny bundle, built once per session on one gloo rank (tests/inference gets it via its
conftest, tests/test_cli.py imports it); it lives at a fixed place in the session's temp folder and is
built only if it is not there yet. `no_loading`: any model build, weight load or process group start
fails the test (for errors that must come first).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.multirank import run_ranks


def _build(rank, world, out):
    from megatron_xomni.inference.pipeline import init_process_group
    from megatron_xomni.inference.tiny import build_tiny_bundle
    from megatron_xomni.world import sample_world

    init_process_group(seed=0)
    build_tiny_bundle(out, seed=0)
    # A world image to ask questions about (64x64: the tiny preprocessing keeps it as is).
    sample_world(0, seed=0, height=64, width=64).image.save(f"{out}/question.png")
    Path(out, "READY").write_text("ok")
    return True


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.getbasetemp() / "xomni_bundle"
    if not (out / "READY").exists():
        run_ranks(_build, 1, str(out))
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail loudly if anything would build a model, load weights or start a process group."""
    import megatron_xomni.models.flux_decoder as dec
    import megatron_xomni.inference.pipeline as pipe
    import megatron_xomni.models.xomni.builder as builder
    import megatron_xomni.models.siglip_vq as tok

    calls = []

    def boom(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called before validation finished")
        return f

    monkeypatch.setattr(builder, "build_model_chunks", boom("build_model_chunks"))
    monkeypatch.setattr(pipe, "init_process_group", boom("init_process_group"))
    monkeypatch.setattr(tok.SiglipVQTokenizer, "from_pretrained", classmethod(lambda *a, **k: boom("tokenizer")()))
    monkeypatch.setattr(dec.XOmniDecoder, "from_pretrained", classmethod(lambda *a, **k: boom("decoder")()))
    return calls
