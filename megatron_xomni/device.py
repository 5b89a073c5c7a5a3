"""What the machine offers (CUDA, Transformer Engine, Apex), and one notice instead of a warnings flood.

megatron-core warns at import time, once per module, that Transformer Engine / Apex are missing
(about ten UserWarnings per process, in every rank and worker). That is expected on a CPU and
fixable on a GPU machine, so it deserves one line, not ten: `quiet_missing_extras()` filters those
warnings in this process and, through $PYTHONWARNINGS, in the processes it starts (forkservers,
spawned workers, subprocesses); `megatron_xomni/__init__.py` calls it so the filter is in place
before anything imports megatron-core. Entry points then call `announce_missing_extras()` where
real work starts, which prints the single notice (rank 0, once per process).

Detection never imports Transformer Engine or Apex (importlib.util.find_spec only), nor torch
before it is needed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

GPU_EXTRA = "pip install megatron-xomni[gpu]"
# Start of every megatron-core 0.16 "not installed" warning about these two (matched case-insensitively).
_MESSAGES = ("Transformer Engine and Apex are not installed", "Apex is not installed")
_announced = False


def cuda_available() -> bool:
    """A usable CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def transformer_engine_installed() -> bool:
    """transformer_engine is importable (not imported here)."""
    return importlib.util.find_spec("transformer_engine") is not None


def apex_installed() -> bool:
    return importlib.util.find_spec("apex") is not None


def quiet_missing_extras() -> None:
    """Drop megatron-core's TE/Apex "not installed" warnings here and in child interpreters (idempotent)."""
    for msg in _MESSAGES:
        warnings.filterwarnings("ignore", message=msg, category=UserWarning)
    entries = [f"ignore:{msg}:UserWarning" for msg in _MESSAGES]
    current = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    missing = [e for e in entries if e not in current]
    if missing:
        os.environ["PYTHONWARNINGS"] = ",".join(current + missing)


def missing_extras_notice() -> str | None:
    """The one-line notice, or None when Transformer Engine is installed (with TE, Apex is not needed:
    its only use here, the local spec's fused norm, is replaced by TE's)."""
    if transformer_engine_installed():
        return None
    if cuda_available():
        return (f"megatron-xomni: Transformer Engine is not installed, so PyTorch fallbacks run without fused "
                f"kernels or FP8: {GPU_EXTRA}")
    return (f"megatron-xomni: Transformer Engine is not installed, PyTorch fallbacks are used (as expected "
            f"without a GPU; on a GPU machine: {GPU_EXTRA})")


def announce_missing_extras(stream=None) -> None:
    """Filter megatron-core's warnings and print the notice once per process, on global rank 0."""
    global _announced
    quiet_missing_extras()
    if _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced = True
    notice = missing_extras_notice()
    if notice:
        print(notice, file=stream or sys.stderr, flush=True)
