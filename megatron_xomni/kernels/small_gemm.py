"""`small_gemm.c`: fp32 products of a decode step's few rows, x @ w.T (+ b), reading the weight in place.

`linear()` returns None whenever the kernel does not apply, and the caller runs its library path:
the kernel unavailable or switched off (`kernels.build`), not fp32 / not CPU / inner dimension not
contiguous, more than 32 rows (a prompt prefill: oneDNN is compute-bound there and faster),
autograd recording (the kernels have no backward), or more than one torch thread (the kernels are
single-threaded; the library paths use the thread pool). Measured in a 4-layer decode stack
(benchmarks/RESULTS.md): the dot-product tiles are 1.9-2x oneDNN at 8 rows; at 16 rows the
broadcast form (`xomni_small_gemm_bcast`) is 1.6-1.7x oneDNN (the tiles 1.4x at fan-in 256 but
0.8x at 512, where the weights stream from DRAM), at 24-32 rows 1.05-1.2x, so 9-32 rows take it.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from megatron_xomni.kernels import build

MAX_ROWS = 32
# Up to this many rows the dot-product tiles run; above it (9-32 rows) the broadcast form, where
# 16 (32) rows x 2 fan-in positions fill the two (four) vectors each weight pair multiplies.
DOT_ROWS = 8

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_GEMM_ARGS = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64]
LIBRARY = build.Library("small_gemm.c", abi=3, signatures={
    "xomni_small_gemm": (None, _GEMM_ARGS), "xomni_small_gemm_bcast": (ctypes.c_int, _GEMM_ARGS)})


def available() -> bool:
    return LIBRARY.get() is not None


def why_unavailable() -> Optional[str]:
    return LIBRARY.why_unavailable()


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """x [M, K] @ w[N, K].T (+ b [N]) as a new [M, N] tensor, or None where the kernel does not apply."""
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[0] > MAX_ROWS:
        return None
    if (x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or x.stride(1) != 1 or w.stride(1) != 1 or w.dim() != 2
            or x.shape[1] != w.shape[1] or torch.get_num_threads() != 1):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return None
    if b is not None and (b.dtype != torch.float32 or b.dim() != 1 or b.shape[0] != w.shape[0] or b.stride(0) != 1):
        return None
    lib = LIBRARY.get()
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
