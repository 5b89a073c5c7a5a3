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
