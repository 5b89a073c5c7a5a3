"""Images per second of `XOmniPipeline.generate` (AR codes + tokenizer features + diffusion decoder).

    python benchmarks/generate_speed.py                           # tiny random bundle on the CPU
    python benchmarks/generate_speed.py --bundle B --size 384x384 --batch 8 --decoder-steps 28

Without --bundle a random tiny bundle (megatron_xomni.inference.tiny) is written to a temp folder.
Printed per batch size: wall seconds (best of --repeats) for the AR rollout alone (generate_codes),
for the full generate, and images/s of the full generate.
"""
from __future__ import annotations

import argparse
import tempfile
import time


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="model bundle (default: a random tiny one)")
    p.add_argument("--size", default="64x64", help="HxW pixels")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="images per generate call")
    p.add_argument("--decoder-steps", type=int, default=None, help="default: the decoder's config")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from megatron_xomni.cli import parse_size
    from megatron_xomni.inference import XOmniPipeline, init_process_group
    from megatron_xomni.data.image_grid import ImageGrid
    from megatron_xomni.inference.tiny import build_tiny_bundle
    from megatron_xomni.parallel import destroy_parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    init_process_group(seed=0)
    bundle = args.bundle or build_tiny_bundle(tempfile.mkdtemp(prefix="xomni_gen_bench_") + "/bundle")
    pipe = XOmniPipeline.from_bundle(str(bundle), max_rows_per_forward=max(args.batch))
    steps = args.decoder_steps or pipe.decoder.cfg.num_inference_steps
    pipe.generate(["warm up"], h, w, seeds=[0], decoder_steps=steps)
    print(f"bundle {bundle}; {h}x{w} px ({ImageGrid.from_pixels(h, w, pipe.spec.patch_size).num_tokens} image tokens), decoder {steps} steps, "
          f"threads {torch.get_num_threads()}, device {pipe.device}")
    print(f"{'batch':>5s} {'AR s':>8s} {'total s':>8s} {'images/s':>9s}")
    for b in args.batch:
        prompts = [f"a red circle number {i}" for i in range(b)]
        seeds = list(range(b))
        t_ar = _best(lambda: pipe.generate_codes(prompts, h, w, seeds), args.repeats)
        t_all = _best(lambda: pipe.generate(prompts, h, w, seeds, decoder_steps=steps), args.repeats)
        print(f"{b:5d} {t_ar:8.3f} {t_all:8.3f} {b / t_all:9.2f}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
