"""`decode_attention.c`: a decode step's attention over its static KV cache in one call.

`attend_step()` returns None whenever the kernel does not apply, and the caller runs its torch
path (RoPE by tensor ops, cache writes, SDPA): the kernel unavailable or switched off
(`kernels.build`), not fp32 / not CPU, a head dimension that is not a multiple of 32, a cache or
row layout other than decode's, autograd recording, or more than one torch thread.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from megatron_xomni.kernels import build

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
LIBRARY = build.Library("decode_attention.c", abi=1, signatures={
    "xomni_decode_attention": (ctypes.c_int, [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR,
                                              _I64, _I64, _I64, ctypes.c_float, _PTR])})


def available() -> bool:
    return LIBRARY.get() is not None


def why_unavailable() -> Optional[str]:
    return LIBRARY.why_unavailable()


def attend_step(qkv: torch.Tensor, groups: int, per_group: int, dim: int, cos: torch.Tensor, ssin: torch.Tensor,
                pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """One new token per row: [R, groups * per_group * dim], or None where the kernel does not apply.

    qkv [R, groups * (per_group + 2) * dim]: per KV group its queries, key and value (megatron-core's
    fused QKV layout). cos / ssin [max_len, dim]: rope(x) = x * cos + roll(x, dim / 2) * ssin at
    the row's position. pos [R] int64: each row's position; its rotated key and its value are
    written to k_cache / v_cache [R, groups, max_len, dim] there, and its queries attend over
    positions 0..pos. Output heads in (group, query) order, as SDPA with GQA.
    """
    tensors = (qkv, cos, ssin, k_cache, v_cache)
    if (dim % 32 or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or pos.dtype != torch.int64 or pos.device.type != "cpu" or torch.get_num_threads() != 1):
        return None
    rows = qkv.shape[0]
    if (qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] != groups * (per_group + 2) * dim
            or not (cos.is_contiguous() and ssin.is_contiguous() and pos.is_contiguous())
            or cos.shape != ssin.shape or cos.shape[1] != dim or pos.shape != (rows,)
            or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride()
            or k_cache.dim() != 4 or k_cache.shape[0] != rows or k_cache.shape[1] != groups
            or k_cache.shape[3] != dim or k_cache.stride(3) != 1 or k_cache.stride(2) != dim
            or k_cache.shape[2] > cos.shape[0]):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    lib = LIBRARY.get()
    if lib is None:
        return None
    out = torch.empty(rows, groups * per_group * dim, dtype=torch.float32)
    rc = lib.xomni_decode_attention(rows, groups, per_group, dim, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
                                    ssin.data_ptr(), pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                    k_cache.stride(0), k_cache.stride(1), k_cache.shape[2], scale, out.data_ptr())
    if rc == -2:
        raise MemoryError("decode_attention: no scratch for the scores")
    if rc == -3:
        raise IndexError(f"decode_attention: a position outside the cache of {k_cache.shape[2]} positions")
    return None if rc else out
