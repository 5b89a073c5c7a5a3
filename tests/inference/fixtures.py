"""The tiny bundle shared by the inference and CLI tests, built once per session on one gloo rank.

Both tests/inference (via its conftest) and tests/test_cli.py import the `bundle` fixture; the bundle
lives at a fixed place in the session's temp folder and is built only if it is not there yet.
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
