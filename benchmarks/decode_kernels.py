"""A decode step's linears and attention: `kernels.small_gemm` vs the library calls it replaces.

    python benchmarks/decode_kernels.py                          # config 2: 16 rows, hidden 512
    python benchmarks/decode_kernels.py --rows 8 --hidden 256    # config 1

One thread, fp32, milliseconds per decode step (median of `--repeats` rounds):
  - linears: the 17 products of a 4-layer step in order (QKV, output projection, gate+up, down per
    layer, then the text head), on weights shaped as `rollout_throughput.py`'s model, with
      `decode.linear` as it dispatches (the kernel where it applies), the dot-product tiles and
      the broadcast form forced, and `decode.linear` with the kernel switched off (oneDNN / MKL);
  - attention: a decode step's RoPE, cache write and attention over a 4-layer static KV cache
    filled to `--length` positions, with `kernels.decode_attention` vs the tensor ops + SDPA decode
    runs without it, and the time to merely sum the same cache bytes (the stream floor); right
    after a 48 MiB buffer was read (as a step's weights push the cache out of L3) and hot.
Outputs of every variant are checked against each other before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _median_ms(fn, repeats: int, inner: int, before=None) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        total = 0.0
        for _ in range(inner):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        times.append(total / inner * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--length", type=int, default=64, help="filled cache positions (attention)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from megatron_xomni.inference import decode
    from megatron_xomni.kernels import build, decode_attention, small_gemm

    lib = small_gemm.LIBRARY.get()
    if lib is None or not decode_attention.available():
        raise SystemExit(f"kernels unavailable: {small_gemm.why_unavailable() or decode_attention.why_unavailable()}")
    M, H = args.rows, args.hidden
    d = H // args.heads
    groups = max(1, args.heads // 2)
    shapes = []  # (fan_in, fan_out) in step order, as rollout_throughput.py's Qwen2
    for _ in range(args.layers):
        shapes += [(H, H + 2 * groups * d), (H, H), (H, 4 * H), (2 * H, H)]
    shapes.append((H, args.vocab))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.05 for k, n in shapes]
    xs = {k: torch.randn(M, k, generator=g) for k, _ in shapes}

    def forced(fn):
        def step():
            outs = []
            for w in ws:
                x = xs[w.shape[1]]
                out = torch.empty(M, w.shape[0])
                fn(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None, out.data_ptr(), w.shape[0],
                   M, w.shape[0], w.shape[1])
                outs.append(out)
            return outs
        return step

    def dispatched():
        return [decode.linear(xs[w.shape[1]], w) for w in ws]

    def library():
        with build.disabled():
            return dispatched()

    linears = {"decode.linear (kernel where it applies)": dispatched, "library (oneDNN / MKL)": library,
               "dot-product tiles, forced": forced(lib.xomni_small_gemm)}
    if M <= small_gemm.MAX_ROWS:
        linears["broadcast form, forced"] = forced(lib.xomni_small_gemm_bcast)
    ref = library()
    for name, fn in linears.items():
        err = max((a - b).abs().max().item() for a, b in zip(fn(), ref))
        assert err < 1e-4, f"{name}: max difference {err:.2e} from the library"
    mb = sum(w.numel() for w in ws) * 4 / 2 ** 20
    print(f"linears: {M} rows, hidden {H}, {args.layers} layers + head, {mb:.1f} MiB of weights; ms per step")
    for name, fn in linears.items():
        print(f"  {name:45s} {_median_ms(fn, args.repeats, 30):7.3f}")

    # Attention of a decode step (RoPE, cache write, attention) per layer, on caches as decode
    # allocates them [rows, groups, max_len, d], every row at position `length - 1`.
    max_len, t = args.length + 32, args.length
    kc = [torch.randn(M, groups, max_len, d, generator=g) for _ in range(args.layers)]
    vc = [torch.randn(M, groups, max_len, d, generator=g) for _ in range(args.layers)]
    per_group = args.heads // groups
    qkv = torch.randn(M, groups * (per_group + 2) * d, generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.outer(torch.arange(max_len).float(), inv).repeat(1, 2)
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    ssin = torch.cat([-sin[:, :d // 2], sin[:, d // 2:]], dim=-1)
    pos = torch.full((M,), t - 1, dtype=torch.long)
    evict = torch.randn(12 * 2 ** 20)  # 48 MiB: more than the L3

    def torch_ops(k, v):  # what decode runs without the kernel (tensor-op RoPE, cache write, SDPA)
        x = qkv.view(M, groups, per_group + 2, d)
        qk = x.narrow(2, 0, per_group + 1)
        qk = qk * cos[t - 1] + torch.roll(qk, d // 2, dims=-1) * ssin[t - 1]
        q = qk.narrow(2, 0, per_group).reshape(M, groups * per_group, 1, d)
        k.select(2, t - 1).copy_(qk.select(2, per_group))
        v.select(2, t - 1).copy_(x.select(2, per_group + 1))
        return F.scaled_dot_product_attention(q, k.narrow(2, 0, t), v.narrow(2, 0, t), scale=d ** -0.5,
                                              enable_gqa=per_group > 1).reshape(M, -1)

    def kernel(k, v):
        return decode_attention.attend_step(qkv, groups, per_group, d, cos, ssin, pos, k, v, d ** -0.5)

    variants = {"decode_attention kernel": kernel, "tensor ops + SDPA (enable_gqa)": torch_ops,
                "sum of the filled cache bytes (floor)": lambda k, v: k.narrow(2, 0, t).sum() + v.narrow(2, 0, t).sum()}
    a = [kernel(k, v) for k, v in zip(kc, vc)]
    b = [torch_ops(k, v) for k, v in zip(kc, vc)]
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    assert err < 1e-5, f"attention: max difference {err:.2e} from SDPA"
    cache_mb = 2 * args.layers * M * groups * t * d * 4 / 2 ** 20
    print(f"attention: {M} rows, {args.heads} heads / {groups} KV groups of {d}, {t} positions, "
          f"{args.layers} layers ({cache_mb:.1f} MiB read); ms per step, cache out of L3 | hot")
    for name, fn in variants.items():
        step = (lambda fn: lambda: [fn(k, v) for k, v in zip(kc, vc)])(fn)
        print(f"  {name:45s} {_median_ms(step, args.repeats, 10, before=evict.sum):7.3f} | "
              f"{_median_ms(step, args.repeats, 30):7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
