"""The oneDNN route of the parallel linears' GEMMs (models/xomni/cpu_linear.py) on CPU.

- `OneDNNLinear` against a float64 reference: forward, input and weight gradients of odd-sized
  products (above and below the size where it hands the call to F.linear), with an error no
  larger than a few times MKL's own fp32 error on the same inputs; oneDNN's kernel really ran.
- A built model: every Column/RowParallelLinear is routed; loss and every gradient agree with
  megatron-core's own function (routing off) to fp32 rounding; FlopCounterMode counts the
  same FLOPs either way.
TP > 1 (the input gradient's all-reduce) is covered by tests/models/xomni/test_parallel.py: its
TP2 / TP2xPP2 / TP2xDP2 layouts run routed and match the single-rank run and transformers.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_xomni.models.xomni import cpu_linear
from tests.multirank import run_ranks

pytestmark = pytest.mark.skipif(not cpu_linear.enabled(), reason="this torch build has no oneDNN")


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("m,k,n,bias", [(301, 96, 203, True), (257, 131, 77, False), (5, 7, 3, True)])
def test_function_matches_float64(m, k, n, bias):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_() if bias else None
    up = torch.randn(m, n, generator=g)  # upstream gradient

    with FlopCounterMode(display=False) as counter:
        y = cpu_linear.OneDNNLinear.apply(x, w, b, False, None)
        y.backward(up)
    kernels = counter.get_flop_counts()["Global"]
    big = m * n * k >= 1 << 20
    assert (torch.ops.mkldnn._linear_pointwise in kernels) == big
    assert counter.get_total_flops() == 3 * 2 * m * n * k  # forward, input and weight gradients

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(up.double())
    # MKL's fp32 error on the same products: the scale of the rounding the route may differ by.
    mkl = torch.nn.functional.linear(x.detach(), w.detach(), None if b is None else b.detach())
    mkl_dx, mkl_dw = up @ w.detach(), up.t() @ x.detach()
    for ours, ref, theirs in ((y, y64, mkl), (x.grad, x64.grad, mkl_dx), (w.grad, w64.grad, mkl_dw)):
        assert _rel(ours.detach(), ref) <= max(4 * _rel(theirs, ref), 1e-7)
    if bias:
        assert _rel(b.grad, b64.grad) <= 1e-6


def _model_rank(rank, world):
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    pg = initialize_parallel(ParallelConfig(), seed=0)
    (model,) = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    with torch.no_grad():  # non-degenerate weights: norms near 1, larger matrices
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    routed = sum("_forward_impl" in vars(m) for m in linears)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512 + 256, (3, 97), generator=g)
    pos = torch.arange(96).expand(3, 96)
    out = {"linears": len(linears), "routed": routed}
    for flag in (True, False):
        cpu_linear.set_enabled(flag)
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).mean()
            loss.backward()
        out[flag] = {"loss": loss.item(), "flops": counter.get_total_flops(),
                     "onednn": torch.ops.mkldnn._linear_pointwise in counter.get_flop_counts()["Global"],
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    cpu_linear.set_enabled(True)
    return out


def test_model_routes_every_linear_and_matches_megatron_core():
    (res,) = run_ranks(_model_rank, 1)
    assert res["linears"] >= 10 and res["routed"] == res["linears"]
    on, off = res[True], res[False]
    assert on["onednn"] and not off["onednn"]
    assert on["flops"] == off["flops"]
    assert abs(on["loss"] - off["loss"]) <= 1e-6 * abs(off["loss"])  # measured: equal
    worst = max(((on["grads"][n] - g).norm() / g.norm()).item() for n, g in off["grads"].items() if g.norm() > 0)
    assert worst <= 3e-6, f"largest relative gradient difference {worst:.1e}"  # measured 7.9e-7
