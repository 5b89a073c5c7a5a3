"""The small-row GEMM kernel against a float64 reference, and the decode path that uses it.

Tolerance: the classical bound for a float32 dot product of length K, |fl(x.w) - x.w| <=
gamma_K * sum|x_i w_i| with gamma_K = K u / (1 - K u), u = 2**-24, per output element (with a bias,
K + 1 summands: gamma_{K+1} on the products and u on the bias). A wrong lane,
a missed K tail, a dropped bias or a row/column mix-up misses it by orders of magnitude.
"""

import pytest
import torch

from megatron_xomni.kernels import build, small_gemm
from megatron_xomni.device import torch_threads as threads

pytestmark = pytest.mark.skipif(not small_gemm.available(), reason=f"kernel unavailable: {small_gemm.why_unavailable()}")


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):  # the kernel is single-threaded: with more threads linear() declines
        yield


def _check(x, w, b):
    y = small_gemm.linear(x, w, b)
    assert y is not None
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    k = x.shape[1] + (b is not None)  # the bias is one more summand: gamma_{K+1} (a lone product: 2 roundings)
    u = 2.0 ** -24
    bound = (k * u / (1 - k * u)) * (x.double().abs() @ w.double().abs().T) + (0 if b is None else u * b.double().abs())
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max err {err.max():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"
    return err.max().item()


@pytest.mark.parametrize("m", [1, 3, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("k,n", [(256, 384), (17, 5), (200, 257), (1, 2), (63, 1)])
def test_matches_float64_bound(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.1
    b = torch.randn(n, generator=g)
    _check(x, w, b)
    _check(x, w, None)


@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("k,n", [(1031, 33), (1408, 20), (512, 3)])  # K blocks of 512 and a masked tail
def test_wide_fan_in(m, k, n):
    g = torch.Generator().manual_seed(m + k)
    _check(torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g))


@pytest.mark.parametrize("m", [9, 12, 16, 17, 25, 32])
@pytest.mark.parametrize("k,n", [(257, 17), (512, 33), (1031, 16), (300, 1), (1408, 47), (2, 25), (1, 12), (15, 13)])
def test_broadcast_form(m, k, n):
    """9-32 rows take the broadcast form (two vectors of row pairs up to 16 rows, four up to 32): odd
    K (a lone last position), K and N tails, one output column, whole and partial blocks of weight
    rows, bias or none."""
    assert m > small_gemm.DOT_ROWS
    g = torch.Generator().manual_seed(7 * m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)
    _check(x, w, b)
    _check(x, w, None)


def test_strided_rows_and_weight_views():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(12, 300, generator=g)
    x = big[1:11:2, 20:276]  # rows 2 * 300 apart, an offset start
    wfull = torch.randn(96, 256, generator=g)
    w = wfull[32:64]  # a row block of a parameter, as a TP shard or the image head slice
    assert x.stride() == (600, 1)
    _check(x, w, None)
    wide = torch.randn(40, 700, generator=g)[3:35:2, 100:612]  # 16 rows for the broadcast form
    assert wide.stride() == (1400, 1)
    _check(wide, torch.randn(80, 800, generator=g)[10:60, 200:712], None)
    _check(torch.randn(60, 700, generator=g)[1:59:2, 5:517], torch.randn(30, 600, generator=g)[:, 50:562], None)


def test_refuses_what_it_cannot_do():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    assert small_gemm.linear(torch.randn(33, 32), w) is None  # more rows than MAX_ROWS
    assert small_gemm.linear(x.double(), w.double()) is None
    assert small_gemm.linear(x.t().contiguous().t(), w) is None  # inner dimension strided
    wg = w.clone().requires_grad_()
    assert small_gemm.linear(x, wg) is None  # autograd recording: no backward here
    with torch.no_grad():
        assert small_gemm.linear(x, wg) is not None
    with threads(2):
        assert small_gemm.linear(x, w) is None  # single-threaded kernel: the thread pool's paths run
    with build.disabled():
        assert small_gemm.linear(x, w) is None


def test_reads_the_current_weight_values():
    """No cached or packed copy: an in-place update (an optimizer step) is seen by the next call."""
    x, w = torch.randn(8, 64), torch.randn(40, 64)
    before = small_gemm.linear(x, w)
    w.mul_(-2.0)
    torch.testing.assert_close(small_gemm.linear(x, w), -2.0 * before, rtol=0, atol=1e-5)
