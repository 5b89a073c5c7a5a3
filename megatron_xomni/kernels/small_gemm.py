"""Build, load and call `small_gemm.c`: out = x @ w.T (+ b) in fp32 for a decode step's few rows.

The C source is compiled once per machine with the system C compiler (`$CC`, else `cc`/`gcc`)
into a cache folder (`$XOMNI_KERNEL_CACHE`, else `~/.cache/megatron_xomni/kernels`) under a name
that hashes the source and flags; the shared object is written to a temporary name and renamed,
so ranks that build at once never load a half-written file. It is called through ctypes with the
tensors' data pointers: no copy of the weight, no torch extension build (seconds, not minutes).

`linear()` returns None whenever the kernel does not apply, and the caller runs its library path:
no AVX-512 (torch's CPU capability), no compiler, `XOMNI_SMALL_GEMM=0`, `set_enabled(False)`,
not fp32 / not CPU / inner dimension not contiguous, more rows than `rows_limit(K)` (measured in a
4-layer decode stack: the kernel is 1.4-1.9x oneDNN at 8 rows, 1.4x at 16 rows of fan-in 256, but
0.8-0.9x at 16 rows of fan-in >= 512, where oneDNN's swapped call streams the weight better; 1.0x
at 32 rows), autograd recording (the kernel has no backward), or more than one torch
thread (the kernel is single-threaded; the library paths use the thread pool).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("small_gemm.c")
FLAGS = ["-O3", "-mavx512f", "-mfma", "-shared", "-fPIC"]
MAX_ROWS = 16


def rows_limit(fan_in: int) -> int:
    """Most rows the kernel takes at this fan-in (where it measured faster than oneDNN)."""
    return MAX_ROWS if fan_in <= 256 else 8

_ABI = 1

_lib = None
_why_not: Optional[str] = None  # set once the build was tried and failed / does not apply
_enabled = os.environ.get("XOMNI_SMALL_GEMM", "1") != "0"


def set_enabled(flag: bool) -> None:
    """Use the kernel where it applies (True, the default) or never (the library-only comparison)."""
    global _enabled
    _enabled = bool(flag)


def _cache_dir() -> Path:
    root = os.environ.get("XOMNI_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "megatron_xomni" / "kernels"


def _build() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"small_gemm-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            errors = [line for line in res.stderr.splitlines() if "error" in line] or res.stderr.splitlines()
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {errors[0] if errors else res.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    """The loaded library, or None with the reason in `why_unavailable()` (tried once per process)."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    try:
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            raise RuntimeError(f"the CPU has no AVX-512 (torch reports {torch.backends.cpu.get_cpu_capability()})")
        lib = ctypes.CDLL(str(_build()))
        if lib.xomni_small_gemm_abi() != _ABI:
            raise RuntimeError("stale kernel build (ABI mismatch): clear the kernel cache")
        fn = lib.xomni_small_gemm
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        _lib = fn
    except (OSError, RuntimeError) as e:
        _why_not = str(e)
        log.info("small_gemm kernel unavailable, decode linears use oneDNN/MKL: %s", e)
    return _lib


def available() -> bool:
    return _enabled and _load() is not None


def why_unavailable() -> Optional[str]:
    """None when the kernel is usable, else why not (for benchmarks and logs)."""
    if not _enabled:
        return "disabled (set_enabled(False) or XOMNI_SMALL_GEMM=0)"
    _load()
    return _why_not


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """x [M, K] @ w[N, K].T (+ b [N]) as a new [M, N] tensor, or None where the kernel does not apply."""
    if not _enabled or x.dim() != 2 or x.shape[0] == 0 or x.shape[0] > rows_limit(x.shape[-1]):
        return None
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or x.stride(1) != 1 or w.stride(1) != 1 or w.dim() != 2
            or x.shape[1] != w.shape[1] or torch.get_num_threads() != 1):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    if b is not None and (b.dtype != torch.float32 or b.dim() != 1 or b.shape[0] != w.shape[0] or b.stride(0) != 1):
        return None
    fn = _lib if _lib is not None else _load()
    if fn is None:
        return None
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    fn(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if b is None else b.data_ptr(),
       out.data_ptr(), n, m, n, k)
    return out
