"""The fused decode-step attention kernel against a float64 reference written here.

Reference: RoPE as rope(x) = x cos + roll(x, d/2) ssin at each row's position, the rotated key and
the value stored at that position, and for every query softmax(scale q.k) over positions 0..pos of
its KV group, times the values, in float64. The kernel works in float32 (a polynomial exp, its own
summation order): outputs of size ~1 agree to ~5e-7, so a tolerance of 2e-6 fails any wrong
position, group, rotation half, scale or a softmax over one position too many.
"""

import pytest
import torch

from megatron_xomni.device import torch_threads as threads
from megatron_xomni.kernels import build, decode_attention

pytestmark = pytest.mark.skipif(not decode_attention.available(),
                                reason=f"kernel unavailable: {decode_attention.why_unavailable()}")


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):
        yield


def _tables(length, d, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.outer(torch.arange(length, dtype=torch.float64), inv).repeat(1, 2)
    sin = torch.sin(f)
    return torch.cos(f).float(), torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], -1).float()


def _reference(qkv, cos, ssin, pos, kc, vc, g, G, d, scale):
    """float64 outputs and the caches after the step (inputs untouched)."""
    R = qkv.shape[0]
    kc, vc = kc.double().clone(), vc.double().clone()
    x = qkv.double().view(R, g, G + 2, d)
    c, s = cos.double()[pos].view(R, 1, 1, d), ssin.double()[pos].view(R, 1, 1, d)
    qk = x[:, :, :G + 1] * c + torch.roll(x[:, :, :G + 1], d // 2, -1) * s
    out = []
    for r in range(R):
        p = int(pos[r])
        kc[r, :, p], vc[r, :, p] = qk[r, :, G], x[r, :, G + 1]
        scores = torch.einsum("ghd,gtd->ght", qk[r, :, :G], kc[r, :, :p + 1]) * scale
        out.append(torch.einsum("ght,gtd->ghd", torch.softmax(scores, -1), vc[r, :, :p + 1]).reshape(-1))
    return torch.stack(out), kc, vc


@pytest.mark.parametrize("rows,groups,per_group,dim,max_len", [
    (8, 2, 2, 64, 80),    # config 1's shapes
    (16, 2, 2, 128, 96),  # config 2's
    (3, 3, 7, 32, 50),    # Qwen-like G = 7, odd rows
    (4, 2, 3, 256, 40),   # two 128-column passes over the values
    (5, 1, 1, 96, 17),    # one query per group, 17 = 16 + 1 positions (a block of one key)
])
def test_matches_float64_reference(rows, groups, per_group, dim, max_len):
    g = torch.Generator().manual_seed(rows * 100 + dim)
    cos, ssin = _tables(max_len, dim)
    qkv = torch.randn(rows, groups * (per_group + 2) * dim, generator=g)
    pos = torch.randint(0, max_len, (rows,), generator=g)
    pos[0], pos[-1] = 0, max_len - 1  # a lone position and a full cache
    kc = torch.randn(rows + 3, groups, max_len, dim, generator=g)[1:rows + 1]  # a row segment of a cache
    vc = torch.randn(rows + 3, groups, max_len, dim, generator=g)[2:rows + 2]
    want, want_k, want_v = _reference(qkv, cos, ssin, pos, kc, vc, groups, per_group, dim, dim ** -0.5)
    got = decode_attention.attend_step(qkv, groups, per_group, dim, cos, ssin, pos, kc, vc, dim ** -0.5)
    assert got is not None and got.shape == (rows, groups * per_group * dim)
    assert (got.double() - want).abs().max().item() <= 2e-6
    assert (kc.double() - want_k).abs().max().item() <= 1e-6  # the rotated key at each row's position
    assert torch.equal(vc.double(), want_v)  # the value stored as it is, nothing else touched


def test_peaked_softmax_and_large_scores():
    """Scores far apart (a near one-hot softmax, exp's underflow range) still sum to the right mix."""
    g = torch.Generator().manual_seed(1)
    rows, groups, G, d, L = 4, 2, 2, 64, 33
    cos, ssin = _tables(L, d)
    qkv = torch.randn(rows, groups * (G + 2) * d, generator=g) * 6.0
    pos = torch.full((rows,), L - 1)
    kc, vc = torch.randn(rows, groups, L, d, generator=g) * 6.0, torch.randn(rows, groups, L, d, generator=g)
    want, _, _ = _reference(qkv, cos, ssin, pos, kc, vc, groups, G, d, 1.0)
    got = decode_attention.attend_step(qkv, groups, G, d, cos, ssin, pos, kc, vc, 1.0)
    assert (got.double() - want).abs().max().item() <= 2e-6


def test_refuses_what_it_cannot_do():
    cos, ssin = _tables(10, 64)
    qkv, pos = torch.randn(2, 2 * 4 * 64), torch.tensor([3, 4])
    kc, vc = torch.zeros(2, 2, 10, 64), torch.zeros(2, 2, 10, 64)
    args = (2, 2, 64, cos, ssin)
    assert decode_attention.attend_step(qkv, *args, pos, kc, vc, 0.1) is not None
    cos16, ssin16 = _tables(10, 16)  # RoPE's half is not a whole number of vectors
    assert decode_attention.attend_step(torch.randn(2, 2 * 4 * 16), 2, 2, 16, cos16, ssin16, pos,
                                        torch.zeros(2, 2, 10, 16), torch.zeros(2, 2, 10, 16), 0.1) is None
    assert decode_attention.attend_step(qkv.double(), *args, pos, kc, vc, 0.1) is None
    assert decode_attention.attend_step(qkv, *args, pos.int(), kc, vc, 0.1) is None
    assert decode_attention.attend_step(qkv, *args, pos, kc.transpose(1, 2), vc.transpose(1, 2), 0.1) is None
    with threads(2):
        assert decode_attention.attend_step(qkv, *args, pos, kc, vc, 0.1) is None
    assert decode_attention.attend_step(qkv.clone().requires_grad_(), *args, pos, kc, vc, 0.1) is None
    with build.disabled():
        assert decode_attention.attend_step(qkv, *args, pos, kc, vc, 0.1) is None
    before = kc.clone()
    with pytest.raises(IndexError, match="outside the cache of 10 positions"):
        decode_attention.attend_step(qkv, *args, torch.tensor([3, 10]), kc, vc, 0.1)
    assert torch.equal(kc, before)  # refused before anything was written
