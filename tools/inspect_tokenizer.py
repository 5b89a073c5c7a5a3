#!/usr/bin/env python
"""Look at what a (frozen) SigLIP-VQ tokenizer keeps: train a small pixel decoder on its codes.

  python tools/inspect_tokenizer.py --tokenizer OUT/tokenizer --out INSPECT [--corpus CORPUS] [--steps 600]

Trains megatron_xomni.models.siglip_vq.pixel_probe.PixelDecoder (a conv upsampler, L2/L1 pixel loss) on
the tokenizer's codes of training images (--corpus, else the built-in world), then on held-out world
images reports PSNR of the reconstructions against two baselines: the mean training image and the
untrained decoder. Writes INSPECT/grid.png (rows of originals, each followed by its reconstructions),
INSPECT/pixel_decoder/ (the trained decoder) and INSPECT/report.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _corpus_pixels(corpus: str, limit: int):
    import torch

    from megatron_xomni.data import CorpusReader, ImagePreprocessConfig

    rows = []
    for sample in CorpusReader(corpus, ImagePreprocessConfig.tiny(), decoder="pillow"):
        if rows and sample["pixels"].shape != rows[0].shape:
            continue  # one image size per run (the decoder batches images)
        rows.append(sample["pixels"])
        if len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"corpus {corpus} yielded no images")
    return torch.stack(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="SiglipVQTokenizer folder (save_pretrained)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--corpus", help="training images (default: the built-in world)")
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=64, help="held-out world images")
    p.add_argument("--image-size", type=int, default=64, help="side of world images")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", choices=["l1", "l2", "l1+l2"], default="l2")
    p.add_argument("--grid-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from megatron_xomni.data import ImagePreprocessConfig, preprocess
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer
    from megatron_xomni.models.siglip_vq.pixel_probe import (PixelDecoder, PixelDecoderConfig, image_grid, psnr,
                                                        tokenizer_features, train_pixel_decoder)
    from megatron_xomni.world import held_out_prompts, sample_world

    try:
        tok = SiglipVQTokenizer.from_pretrained(args.tokenizer).eval()
        pre = ImagePreprocessConfig.tiny()
        if args.corpus:
            train = _corpus_pixels(args.corpus, args.train_images)
        else:
            train = torch.stack([preprocess(sample_world(i, height=args.image_size, width=args.image_size).image, pre)
                                 for i in range(args.train_images)])
        test = torch.stack([preprocess(s.image, pre) for s in
                            held_out_prompts(args.eval_images, height=args.image_size, width=args.image_size)])
        if test.shape[1:] != train.shape[1:]:
            raise ValueError(f"training images are {tuple(train.shape[2:])} but held-out ones {tuple(test.shape[2:])}; "
                             "pass --image-size matching the corpus")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    f_train, f_test = tokenizer_features(tok, train), tokenizer_features(tok, test)
    codes = tok.encode(test)
    grid = (test.shape[-2] // tok.cfg.patch_size, test.shape[-1] // tok.cfg.patch_size)
    dec = PixelDecoder(PixelDecoderConfig(in_dim=tok.cfg.adapter_dim, patch_size=tok.cfg.patch_size, loss=args.loss))
    with torch.no_grad():
        untrained = psnr(dec(f_test, grid), test)
    train_pixel_decoder(dec, f_train, train, args.steps, args.batch_size, args.lr, args.seed,
                        log=lambda m: print(m, flush=True))
    with torch.no_grad():
        recon = dec(f_test, grid)
    report = {
        "psnr_db": psnr(recon, test),
        "psnr_mean_image_db": psnr(train.mean(0, keepdim=True).expand_as(test), test),
        "psnr_untrained_db": untrained,
        "held_out_codes_used": int(codes.unique().numel()),
        "codebook_size": tok.cfg.codebook_size,
        "train_images": int(train.shape[0]),
        "eval_images": int(test.shape[0]),
        "steps": args.steps,
    }
    image_grid(test[: args.grid_images], recon[: args.grid_images]).save(out / "grid.png")
    dec.save_pretrained(out / "pixel_decoder")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"held-out PSNR {report['psnr_db']:.2f} dB (mean image {report['psnr_mean_image_db']:.2f} dB, "
          f"untrained decoder {report['psnr_untrained_db']:.2f} dB); wrote {out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
