"""What the machine offers (CUDA, Transformer Engine, Apex), and one notice instead of a warnings flood.

megatron-core warns at import time, once per module, that Transformer Engine / Apex are missing
(about ten UserWarnings per process, in every rank and worker). That is expected on a CPU and
fixable on a GPU machine, so it deserves one line, not ten: `quiet_missing_extras()` filters those
warnings in this process and, through $PYTHONWARNINGS, in the processes it starts (forkservers,
spawned workers, subprocesses); `megatron_xomni/__init__.py` calls it so the filter is in place
before anything imports megatron-core. Entry points then call `announce_missing_extras()` where
real work starts, which prints the single notice (rank 0, once per process).

The home of device and dtype detection: `transformer_engine_usable()` (TE imports *and* a GPU
exists: what decides the layer spec, fused norms and CP attention), `resolve_dtype()` (inference:
"auto" = bf16 on a GPU, fp32 on the CPU) and `resolve_precision()` (training precision names,
FP8 included). `transformer_engine_installed()` never imports Transformer Engine or Apex
(importlib.util.find_spec only); nothing here imports torch before it is needed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from functools import lru_cache

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


@lru_cache(maxsize=1)
def transformer_engine_usable() -> bool:
    """Transformer Engine is used only where it imports *and* a GPU exists (imports both, once)."""
    if not cuda_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE build (ABI mismatch, missing CUDA libs) means: use the local spec
        return False
    return True


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16")


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with torch's intra-op pool at `n` threads, the previous count restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_dtype(dtype):
    """A torch.dtype from a torch.dtype or a name in DTYPES; "auto": bf16 on a GPU, fp32 on the CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if cuda_available() else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: use auto, float32 or bfloat16")
    return table[dtype]


def resolve_precision(precision: str):
    """Training precision -> (params dtype, TransformerConfig overrides). "auto": bf16 on a GPU, else fp32;
    "fp8": bf16 parameters with Transformer Engine's delayed-scaling FP8 (needs a GPU with TE).
    ValueError (one line) when this machine cannot run it."""
    import torch

    cuda = cuda_available()
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"precision={precision!r}: use auto, fp32, bf16 or fp8")
    if precision == "fp8" and not cuda:
        raise ValueError("precision=fp8 needs a GPU with Transformer Engine: use bf16 or fp32 on CPU")
    if precision == "fp8":
        if not transformer_engine_usable():
            raise ValueError(f"precision=fp8 needs Transformer Engine: {GPU_EXTRA}")
        return torch.bfloat16, {"fp8": "hybrid", "fp8_recipe": "delayed"}
    return (torch.bfloat16 if precision == "bf16" else torch.float32), {}


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
