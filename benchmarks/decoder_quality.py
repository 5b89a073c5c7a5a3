#!/usr/bin/env python
"""Reconstruction quality on held-out built-in world images: the diffusion decoder vs the small
inspection pixel decoder, both fed the same frozen tokenizer's codes, plus the mean-image baseline.

  python benchmarks/decoder_quality.py --tokenizer runs/demo/image_tokenizer/run/export/tokenizer \
      --decoder runs/demo/decoder/export [--held-out 64] [--pixel-steps 600]

Prints PSNR (dB) and SSIM (11x11 Gaussian window, sigma 1.5, on luma; Wang et al. 2004).
"""

import argparse

import torch
import torch.nn.functional as F


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM of [B,3,H,W] images in [-1, 1], on luma in [0, 1]."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x, y = ((x + 1) / 2 * w).sum(1, keepdim=True), ((y + 1) / 2 * w).sum(1, keepdim=True)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 11, 11)
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x**2
    syy = F.conv2d(y * y, k) - mu_y**2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean().item()


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return (10 * torch.log10(4.0 / ((x - y) ** 2).flatten(1).mean(1))).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--decoder", required=True)
    p.add_argument("--held-out", type=int, default=64)
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--pixel-steps", type=int, default=600)
    p.add_argument("--decoder-steps", type=int, default=8)
    args = p.parse_args()
    from megatron_xomni.models.flux_decoder import XOmniDecoder
    from megatron_xomni.models.flux_decoder.sampling import sample_from_codes
    from megatron_xomni.data.corpus_source import pil_to_pixels
    from megatron_xomni.data.world_source import world_images
    from megatron_xomni.inference.tokenize_corpus import load_image_tokenizer
    from megatron_xomni.models.siglip_vq.pixel_probe import (PixelDecoder, PixelDecoderConfig, reconstruct,
                                                        tokenizer_features, train_pixel_decoder)
    from megatron_xomni.world import held_out_prompts

    tok = load_image_tokenizer(args.tokenizer)
    held = pil_to_pixels([s.image for s in held_out_prompts(args.held_out)])
    train, _ = world_images(range(args.train_images), 64, seed=0)
    codes = tok.encode(held)
    diff = sample_from_codes(XOmniDecoder.from_pretrained(args.decoder).eval(), tok, codes,
                             num_inference_steps=args.decoder_steps, generator=0).clamp(-1, 1)
    pix = PixelDecoder(PixelDecoderConfig(in_dim=tok.cfg.adapter_dim))
    train_pixel_decoder(pix, tokenizer_features(tok, train), train, args.pixel_steps)
    with torch.no_grad():
        insp = reconstruct(pix, tok, held).clamp(-1, 1)
    mean = train.mean(0, keepdim=True).expand_as(held)
    print(f"held-out world images: {args.held_out} (64 px)")
    for name, rec in [("diffusion decoder", diff), ("inspection pixel decoder", insp), ("mean image", mean)]:
        print(f"{name:>26}: PSNR {psnr(rec, held):6.2f} dB  SSIM {ssim(rec, held):.3f}")


if __name__ == "__main__":
    main()
