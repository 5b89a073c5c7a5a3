"""SigLIP-VQ tokenizer throughput and nearest-code search speed.

    python benchmarks/tokenizer_throughput.py                    # CPU defaults
    python benchmarks/tokenizer_throughput.py --device cuda --batch 256

Prints (1) images/s of the tiny preset at 64 px and 128 px for `encode` (inference) and a
training step (forward + backward), and (2) the chunked nearest-code search used by the
quantizer against naive `torch.cdist` + `argmin`, with the ratio, agreement and peak
score-matrix memory of each.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megatron_xomni.data.image_grid import ImageGrid
from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, nearest_code, tokenizer_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: list, device: torch.device, iters: int, warmup: int = 1) -> list[float]:
    """Best-of-`iters` seconds per call of each fn, the fns interleaved so that load from other
    processes on a shared machine hits them alike (the minimum is the least-disturbed run)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bench_tokenizer(device: torch.device, batch: int, iters: int, sizes: list[int]) -> None:
    torch.manual_seed(0)
    tok = SiglipVQTokenizer(tokenizer_config("tiny")).to(device)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    for px in sizes:
        x = torch.rand(batch, 3, px, px, device=device) * 2 - 1

        def encode() -> None:
            tok.eval()
            tok.encode(x)

        def step() -> None:
            tok.train()
            feats, aux = tok(x)
            loss = feats.pow(2).mean() + aux["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_enc, t_train = _time([encode, step], device, iters)
        print(f"tiny preset {px:4d}px ({ImageGrid.from_pixels(px, px, tok.cfg.patch_size).num_tokens:3d} tokens/img), batch {batch}: "
              f"encode {batch / t_enc:9.1f} img/s | train step {batch / t_train:9.1f} img/s")


def bench_search(device: torch.device, n: int, k: int, d: int, chunk: int, iters: int) -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(n, d, device=device), dim=-1)
    codes = F.normalize(torch.randn(k, d, device=device), dim=-1)
    t_chunk, t_naive = _time([lambda: nearest_code(z, codes, chunk),
                              lambda: torch.cdist(z, codes).argmin(dim=1)], device, iters)
    agree = (nearest_code(z, codes, chunk) == torch.cdist(z, codes).argmin(dim=1)).float().mean().item()
    print(f"nearest code {n} features x {k} codes x {d} dim ({device.type}, chunk {chunk}): "
          f"chunked dot-argmax {t_chunk * 1e3:8.1f} ms | cdist+argmin {t_naive * 1e3:8.1f} ms | "
          f"speed-up x{t_naive / t_chunk:.2f} | agreement {agree * 100:.2f}% | "
          f"score memory {min(max(1, 2**24 // chunk), n) * min(chunk, k) * 4 / 2**20:.0f} MiB vs {n * k * 4 / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="images per step for the tokenizer benchmark")
    ap.add_argument("--iters", type=int, default=5, help="timed repetitions (best reported)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="square image sizes in px")
    ap.add_argument("--n", type=int, default=4096, help="features in the search benchmark")
    ap.add_argument("--k", type=int, default=16384, help="codes in the search benchmark")
    ap.add_argument("--d", type=int, default=2048, help="code dimension in the search benchmark")
    ap.add_argument("--chunk", type=int, default=4096, help="search chunk size (rows and codes)")
    ap.add_argument("--search-iters", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    bench_tokenizer(device, args.batch, args.iters, args.sizes)
    bench_search(device, args.n, args.k, args.d, args.chunk, args.search_iters)


if __name__ == "__main__":
    main()
