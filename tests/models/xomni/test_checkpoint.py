"""load_xomni: the one model loader. Its happy path at TP1/TP2/TP2xPP2 is tests/test_api.py; here the
ways it refuses, each in one line and before any weights are read, and that a root and one of its
iteration folders load the same tensors."""
from __future__ import annotations

import shutil

import pytest

from tests.inference.fixtures import bundle  # noqa: F401  (session fixture: a tiny saved model)
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(240)


def _errors(rank, world, root, bad_meta, tmp):
    import dataclasses

    import torch

    from megatron_xomni.models.xomni.checkpoint import checkpoint_folder, load_xomni, read_model_config
    from megatron_xomni.parallel import LayoutError, ParallelConfig

    out = {}
    try:  # before any process group: a layout this world cannot hold
        load_xomni(root, ParallelConfig(tensor_parallel=3))
    except LayoutError as e:
        out["layout"] = str(e)
    import megatron.core.parallel_state as ps

    out["initialised_after_layout_error"] = ps.model_parallel_is_initialized()
    chunks, cfg = load_xomni(root)
    folder = checkpoint_folder(root)
    again, _ = load_xomni(folder)  # the iteration folder itself
    out["same"] = all(torch.equal(a, b) for a, b in zip(chunks[0].state_dict().values(), again[0].state_dict().values())
                      if torch.is_tensor(a))
    out["eval"] = not chunks[0].training
    for name, call in {
        "mismatch": lambda: load_xomni(root, model_config=dataclasses.replace(read_model_config(folder), ffn_hidden_size=256)),
        "no_config": lambda: load_xomni(bad_meta),
        "other_layout": lambda: load_xomni(root, ParallelConfig(pipeline_parallel=2)),
        "missing": lambda: load_xomni(f"{tmp}/nothing"),
    }.items():
        try:
            call()
            out[name] = "loaded"
        except (ValueError, FileNotFoundError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_load_xomni_refuses_in_one_line(bundle, tmp_path):
    root = bundle / "model"
    src = next(p for p in root.glob("iter_*") if p.is_dir())
    bad = tmp_path / "no_config"
    shutil.copytree(src, bad)
    (bad / "model_config.json").unlink()
    out, = run_ranks(_errors, 1, root, bad, tmp_path)

    assert "world size 1 is not divisible by TP*PP*CP" in out["layout"]
    assert out["initialised_after_layout_error"] is False  # refused before any process group started
    assert out["same"] and out["eval"]
    assert "cannot be loaded into this model" in out["mismatch"] and out["mismatch"].startswith("ValueError")
    assert "shape mismatch" in out["mismatch"] and "linear_fc1" in out["mismatch"]  # names the tensor
    assert "has no model_config.json" in out["no_config"]
    assert "the parallel state is TP=1 PP=1" in out["other_layout"]
    assert "no checkpoint in" in out["missing"] or "does not exist" in out["missing"]
    for msg in [out["layout"], out["mismatch"], out["no_config"], out["other_layout"], out["missing"]]:
        assert "\n" not in msg, msg
