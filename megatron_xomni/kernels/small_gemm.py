"""Build, load and call `small_gemm.c`: fp32 products of a decode step's few rows, x @ w.T (+ b).

The C source is compiled once per machine with the system C compiler (`$CC`, else `cc`/`gcc`)
into a cache folder (`$XOMNI_KERNEL_CACHE`, else `~/.cache/megatron_xomni/kernels`) under a name
that hashes the source and flags; the shared object is written to a temporary name and renamed,
so ranks that build at once never load a half-written file. It is called through ctypes with the
tensors' data pointers: no copy of the weight, no torch extension build (seconds, not minutes).

`linear()` returns None whenever the kernel does not apply, and the caller runs its library path:
no AVX-512 (torch's CPU capability), no compiler, `XOMNI_SMALL_GEMM=0`, `set_enabled(False)`,
not fp32 / not CPU / inner dimension not contiguous, more than 32 rows (a prompt prefill: oneDNN is
compute-bound there and faster), autograd recording (the kernels have no backward), or more than
one torch thread (the kernels are single-threaded; the library paths use the thread pool).
Measured in a 4-layer decode stack (benchmarks/RESULTS.md): the dot-product tiles are 1.9-2x
oneDNN at 8 rows; at 16 rows the broadcast form (`xomni_small_gemm_bcast`) is 1.6-1.7x oneDNN
(the tiles 1.4x at fan-in 256 but 0.8x at 512, where the weights stream from DRAM), at 24-32 rows
1.05-1.2x, so 9-32 rows take it.

`bmm_nt` / `bmm_nn` are the batched products of a decode step's attention over its KV cache.
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
MAX_ROWS = 32
# Up to this many rows the dot-product tiles run; above it (9-32 rows) the broadcast form, where
# 16 (32) rows x 2 fan-in positions fill the two (four) vectors each weight pair multiplies.
DOT_ROWS = 8

_ABI = 2

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
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.xomni_small_gemm.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64]
        lib.xomni_small_gemm_bcast.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64]
        lib.xomni_small_gemm_bcast.restype = ctypes.c_int
        for name in ("xomni_small_bmm_nt", "xomni_small_bmm_nn"):
            getattr(lib, name).argtypes = [i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64]
        for name in ("xomni_small_gemm", "xomni_small_bmm_nt", "xomni_small_bmm_nn"):
            getattr(lib, name).restype = None
        _lib = lib
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
    if not _enabled or x.dim() != 2 or x.shape[0] == 0 or x.shape[0] > MAX_ROWS:
        return None
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or x.stride(1) != 1 or w.stride(1) != 1 or w.dim() != 2
            or x.shape[1] != w.shape[1] or torch.get_num_threads() != 1):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    if b is not None and (b.dtype != torch.float32 or b.dim() != 1 or b.shape[0] != w.shape[0] or b.stride(0) != 1):
        return None
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    call = lib.xomni_small_gemm if m <= DOT_ROWS else lib.xomni_small_gemm_bcast
    if call(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if b is None else b.data_ptr(),
            out.data_ptr(), n, m, n, k):
        raise MemoryError(f"small_gemm: no scratch for a {m}x{k} operand")
    return out


def _batched_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both fp32 CPU 3-D tensors with a contiguous last dimension, no autograd, one torch thread."""
    return (_enabled and a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] and a.shape[0] > 0
            and a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
            and a.stride(2) == 1 and b.stride(2) == 1 and torch.get_num_threads() == 1
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


def _batched(name: str, a: torch.Tensor, b: torch.Tensor, cols: int, dims: tuple) -> Optional[torch.Tensor]:
    """Call a batched product `name` on a [B, M, *] and b [B, *, *] into a new [B, M, cols] tensor."""
    lib = _lib if _lib is not None else _load()
    if lib is None:
        return None
    bsz, m, _ = a.shape
    out = torch.empty(bsz, m, cols, dtype=torch.float32)
    getattr(lib, name)(bsz, a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
                       out.data_ptr(), m * cols, cols, *dims)
    return out


def bmm_nt(x: torch.Tensor, w: torch.Tensor) -> Optional[torch.Tensor]:
    """x [B, M, K] @ w[B, N, K].transpose(1, 2) as a new [B, M, N] tensor, or None where it does not apply.

    A decode step's attention scores: one KV group's queries against its cached keys, read as they
    lie in the cache (any batch and row strides, e.g. a `narrow` of a static cache).
    """
    if not _batched_ok(x, w) or x.shape[2] != w.shape[2]:
        return None
    m, k, n = x.shape[1], x.shape[2], w.shape[1]
    return _batched("xomni_small_bmm_nt", x, w, n, (m, n, k))


def bmm_nn(p: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """p [B, M, T] @ v [B, T, D] as a new [B, M, D] tensor, or None where it does not apply.

    A decode step's weighted sum of cached values (v read in place, any batch and row strides).
    """
    if not _batched_ok(p, v) or p.shape[2] != v.shape[1]:
        return None
    m, t, d = p.shape[1], p.shape[2], v.shape[2]
    return _batched("xomni_small_bmm_nn", p, v, d, (m, t, d))
