"""fp32 GEMMs of megatron-core's parallel linear layers through oneDNN on CPU.

On CPU, `torch.matmul` in fp32 runs MKL's sgemm. On this project's CPU machines (AMD EPYC, Zen 5)
MKL takes its AVX2 code path while oneDNN's inner product is JIT-compiled for AVX-512: on the
training shapes of the tiny and benchmark models oneDNN gives 2.1-2.3x the FLOP/s of MKL in the
forward, the input gradient and the weight gradient alike (benchmarks/RESULTS.md). megatron-core's
`LinearWithGradAccumulationAndAsyncCommunication` calls `torch.matmul` for all three, so the
local spec's linears, the output heads and the reference policy's forward ran at MKL's speed.

`route_cpu_gemms(model)` points each `ColumnParallelLinear` / `RowParallelLinear` of a model at
`OneDNNLinear` for calls it can take (CPU, fp32, no sequence parallelism, no gradient-accumulation
fusion or deferred weight gradients); every other call runs megatron-core's own function. Only the
kernel changes: the parameters, their layout, the module tree and the collectives (the input
gradient's all-reduce over TP for column-parallel layers) are megatron-core's. On GPU nothing is
routed (cuBLAS is the kernel there either way). Results agree with MKL's to fp32 rounding (a
different summation order), checked against a float64 reference in tests/models/xomni/test_cpu_linear.py.

`set_enabled(False)` sends every call back to megatron-core's function, and the lean decode path's
linears (inference/decode.py) to F.linear: the same-kernel (MKL) comparison in the benchmarks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, register_flop_formula

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's fixed cost per call (~10 us) loses to MKL below about a million multiply-adds.
MIN_MACS = 1 << 20
_enabled = True


def set_enabled(flag: bool) -> None:
    """Route eligible calls to oneDNN (True, the default) or leave every call to megatron-core."""
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    return _AVAILABLE and _enabled


def _gemm(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ w.T (+ bias) for 2-D `a` [m, k] and `w` [n, k]; strided (transposed) operands are read as they are."""
    if a.shape[0] * w.numel() < MIN_MACS:
        return F.linear(a, w, bias)
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


if _AVAILABLE and torch.ops.mkldnn._linear_pointwise not in flop_registry:
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flop(a_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        """FlopCounterMode's count for the kernel: 2 m n k, as for aten.mm."""
        m = 1
        for d in a_shape[:-1]:
            m *= d
        return 2 * m * w_shape[0] * w_shape[1]


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b for 2-D x [m, k], with the forward, input-gradient and weight-gradient GEMMs on oneDNN.

    `allreduce_dgrad`: sum the input gradient over `tp_group` (column-parallel layers at TP > 1),
    overlapped with the weight-gradient GEMM, as megatron-core does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, allreduce_dgrad: bool, tp_group):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        return _gemm(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = handle = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(g, weight.t())
            if ctx.allreduce_dgrad:
                handle = torch.distributed.all_reduce(grad_x, group=ctx.tp_group, async_op=True)
        if ctx.needs_input_grad[1]:
            grad_w = _gemm(g.t(), x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_x, grad_w, grad_b, None, None


def _routed(fallback):
    """A `_forward_impl` that takes the calls OneDNNLinear can do and hands the rest to `fallback`."""

    def forward_impl(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                     grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **kwargs):
        if (enabled() and input.device.type == "cpu" and input.dtype == torch.float32
                and weight.dtype == torch.float32 and not sequence_parallel and not gradient_accumulation_fusion
                and grad_output_buffer is None and not kwargs):
            # 2-D inside the Function; the [s, b, n] view outside it stays an ordinary autograd view
            # (megatron-core's cross entropy writes into the logits in place).
            out = OneDNNLinear.apply(input.reshape(-1, input.shape[-1]), weight, bias, bool(allreduce_dgrad), tp_group)
            return out.view(*input.shape[:-1], weight.shape[0])
        return fallback(input=input, weight=weight, bias=bias,
                        gradient_accumulation_fusion=gradient_accumulation_fusion,
                        allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                        grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
                        tp_group=tp_group, **kwargs)

    return forward_impl


def route_cpu_gemms(model: torch.nn.Module) -> int:
    """Route every Column/RowParallelLinear of `model` (on a CPU-only machine); returns how many."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if not _AVAILABLE or torch.cuda.is_available():
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and "_forward_impl" not in vars(module):
            module._forward_impl = _routed(module._forward_impl)
            n += 1
    return n
