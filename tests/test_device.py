"""One notice instead of megatron-core's Transformer Engine / Apex warnings flood (megatron_xomni.device)."""
import subprocess
import sys

import pytest

from megatron_xomni import device

PROBE = r"""
import os, subprocess, sys
import megatron_xomni  # installs the filter before megatron-core is imported
import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs, megatron.core.distributed
from megatron_xomni.device import announce_missing_extras
os.environ["RANK"] = "1"
announce_missing_extras()                 # not rank 0: silent
os.environ["RANK"] = "0"
announce_missing_extras(); announce_missing_extras()   # once per process
sys.stderr.flush()
# a child interpreter that imports megatron-core without megatron_xomni inherits the filter
child = subprocess.run([sys.executable, "-c", "import megatron.core.optimizer"], capture_output=True, text=True)
print("CHILD", child.stderr.count("not installed"))
"""


@pytest.mark.skipif(device.transformer_engine_installed(), reason="Transformer Engine is installed: nothing to say")
def test_one_notice_per_process_and_no_flood_in_children():
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "not installed" not in " ".join(line for line in lines if not line.startswith("megatron-xomni:"))
    notices = [line for line in lines if line.startswith("megatron-xomni:")]
    assert len(notices) == 1 and device.GPU_EXTRA in notices[0], out.stderr
    assert "CHILD 0" in out.stdout, out.stdout


def test_notice_text(monkeypatch):
    monkeypatch.setattr(device, "transformer_engine_installed", lambda: False)
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert "without fused kernels or FP8: pip install megatron-xomni[gpu]" in device.missing_extras_notice()
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert "as expected without a GPU" in device.missing_extras_notice()
    monkeypatch.setattr(device, "transformer_engine_installed", lambda: True)
    assert device.missing_extras_notice() is None


def test_dtype_and_precision_resolution(monkeypatch):
    """device.py is the one home: "auto" follows the machine, fp8 needs a GPU with Transformer Engine."""
    import torch

    for cuda, auto in [(False, torch.float32), (True, torch.bfloat16)]:
        monkeypatch.setattr(device, "cuda_available", lambda c=cuda: c)
        assert device.resolve_dtype("auto") is auto
        assert device.resolve_precision("auto") == (auto, {})
    assert device.resolve_dtype("bf16") is torch.bfloat16 and device.resolve_dtype(torch.float16) is torch.float16
    assert device.resolve_precision("bf16") == (torch.bfloat16, {})
    with pytest.raises(ValueError, match="dtype='half': use auto, float32 or bfloat16"):
        device.resolve_dtype("half")
    with pytest.raises(ValueError, match="precision='fp16'"):
        device.resolve_precision("fp16")
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(ValueError, match="needs a GPU"):
        device.resolve_precision("fp8")
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "transformer_engine_usable", lambda: False)
    with pytest.raises(ValueError, match="needs Transformer Engine: pip install megatron-xomni"):
        device.resolve_precision("fp8")
    monkeypatch.setattr(device, "transformer_engine_usable", lambda: True)
    assert device.resolve_precision("fp8") == (torch.bfloat16, {"fp8": "hybrid", "fp8_recipe": "delayed"})


def test_transformer_engine_usable_needs_a_gpu(monkeypatch):
    import megatron_xomni.models.xomni.layer_spec as spec

    assert spec.transformer_engine_usable is device.transformer_engine_usable  # one definition, re-exported
    device.transformer_engine_usable.cache_clear()
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    try:
        assert device.transformer_engine_usable() is False
    finally:
        device.transformer_engine_usable.cache_clear()
