"""Decoder speed: seconds per sampled image and per training step.

    python benchmarks/decoder_speed.py                 # tiny preset on CPU (64 px, 8 steps)
    python benchmarks/decoder_speed.py --full-size     # FLUX.1-dev size, random weights, bf16, CUDA:
                                                       # seconds per 1024 px image at 28 steps

The full-size mode needs a GPU with >= 40 GB (12B transformer in bf16 plus activations); it uses
the image variant (no T5/CLIP: their cost is per prompt, not per step) and random weights, which
time exactly like FLUX.1-dev's.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_sampling(dec, grid, steps, batch, repeats, device, cfg_scale):
    from megatron_xomni.models.flux_decoder.sampling import sample

    feats = torch.randn(batch, grid[0] * grid[1], dec.cfg.adapter_dim, device=device)
    sample(dec, feats, grid, num_inference_steps=min(steps, 2), generator=0, guidance_scale=cfg_scale)  # warm-up
    _sync(device)
    t = time.perf_counter()
    for r in range(repeats):
        sample(dec, feats, grid, num_inference_steps=steps, generator=r, guidance_scale=cfg_scale)
    _sync(device)
    return (time.perf_counter() - t) / (repeats * batch)


def bench_train_step(dec, grid, batch, repeats, device, dtype):
    from megatron_xomni.training.flux_decoder import flow_matching_loss, select_trainable

    select_trainable(dec, "all")
    params = [p for p in dec.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = decoder_cfg()
    b = {"pixels": torch.zeros(batch, 3, grid[0] * dec.cfg.token_pixels, grid[1] * dec.cfg.token_pixels), "index": torch.arange(batch),
         "features": torch.randn(batch, grid[0] * grid[1], dec.cfg.adapter_dim),
         "latents": torch.randn(batch, grid[0] * grid[1], dec.cfg.in_channels)}
    times = []
    for step in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        loss = flow_matching_loss(dec, b, step, cfg, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sum(times[1:]) / repeats  # first step is warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full-size", action="store_true", help="FLUX.1-dev dimensions, bf16, CUDA, 1024 px, 28 steps")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 8 tiny / 28 full)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="decoder CFG scale (1 = one branch)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on shared cores)")
    args = p.parse_args()

    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config

    if args.full_size:
        if not torch.cuda.is_available():
            raise SystemExit("--full-size needs CUDA (12B parameters in bf16)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = decoder_config("xomni", "image")
        with torch.device(device):
            dec = build_decoder(cfg, torch_dtype=dtype)
        grid, steps, batch = (64, 64), args.steps or 28, args.batch or 1
    else:
        torch.set_num_threads(args.threads)
        device, dtype = torch.device("cpu"), torch.float32
        cfg = decoder_config("tiny", "image", adapter_dim=64)
        dec = build_decoder(cfg)
        grid, steps, batch = (4, 4), args.steps or 8, args.batch or 8
    dec.eval()
    sec_img = bench_sampling(dec, grid, steps, batch, args.repeats, device, args.cfg_scale)
    train_batch = 1 if args.full_size else 16
    try:  # full size: bf16 weights + AdamW states need ~100 GB; report None where that does not fit
        sec_step = bench_train_step(dec, grid, train_batch, args.repeats, device, dtype)
    except torch.OutOfMemoryError:
        sec_step = None
    print(json.dumps({
        "mode": "full-size" if args.full_size else "tiny-cpu", "device": str(device), "dtype": str(dtype),
        "image_px": [grid[0] * dec.cfg.token_pixels, grid[1] * dec.cfg.token_pixels], "euler_steps": steps, "cfg_scale": args.cfg_scale,
        "transformer_params": sum(p.numel() for p in dec.transformer.parameters()),
        "sec_per_image": round(sec_img, 4), "train_batch": train_batch,
        "sec_per_train_step": None if sec_step is None else round(sec_step, 4),
    }))


if __name__ == "__main__":
    main()
