#!/usr/bin/env python
"""Tokenize a WebDataset image-text corpus into megatron-core token files for the X-Omni AR model.

  python tools/tokenize_corpus.py CORPUS_DIR OUT_PREFIX --text-tokenizer TOK_DIR \\
      --image-tokenizer CKPT_DIR_OR_PRESET --mode generation|understanding|both --workers N [--resume]

Writes OUT_PREFIX_generation.{bin,idx} / OUT_PREFIX_understanding.{bin,idx} (each with a _lossmask twin)
and OUT_PREFIX.json (blend prefixes, counts, skip report). Put the prefixes in DataConfig.blend, with
eod_id from the summary and model.text_vocab_size equal to --text-vocab-size. An interrupted run
continues with --resume (completed shards are kept); outputs do not depend on --workers.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="corpus directory (index.json + shard-*.tar)")
    p.add_argument("out_prefix", help="output prefix")
    p.add_argument("--text-tokenizer", required=True, help="text tokenizer folder (tools/train_text_tokenizer.py)")
    p.add_argument("--image-tokenizer", required=True,
                   help="SiglipVQTokenizer checkpoint folder, or preset 'tiny'/'xomni' (random init, --init-seed)")
    p.add_argument("--mode", choices=["generation", "understanding", "both"], default="both")
    p.add_argument("--workers", type=int, default=1, help="worker processes (shards are split among them)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--text-vocab-size", type=int, default=None,
                   help="model text table size (image id = this + code); default: tokenizer vocab rounded up to 128")
    p.add_argument("--preprocess", choices=["tiny", "xomni"], default=None,
                   help="image size rules (default: tiny for the tiny tokenizer, else xomni)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (workers spread over visible GPUs)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encode call")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--init-seed", type=int, default=0, help="seed of a preset's random init")
    p.add_argument("--decoder", default="pillow", help="image decoder: pillow | dali | auto")
    p.add_argument("--format", default="{}", help='JSON of SequenceFormat fields, e.g. \'{"supervise_eos_in_generation": true}\'')
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    args = p.parse_args(argv)

    from megatron_xomni.device import announce_missing_extras
    from megatron_xomni.inference.tokenize_corpus import TokenizeConfig, tokenize_corpus

    try:
        fmt = json.loads(args.format)
        if not isinstance(fmt, dict):
            raise ValueError("--format must be a JSON object")
        cfg = TokenizeConfig(
            corpus=args.corpus, out_prefix=args.out_prefix, text_tokenizer=args.text_tokenizer,
            image_tokenizer=args.image_tokenizer, mode=args.mode, workers=args.workers, resume=args.resume,
            text_vocab_size=args.text_vocab_size, preprocess=args.preprocess, device=args.device,
            batch_size=args.batch_size, threads_per_worker=args.threads_per_worker, init_seed=args.init_seed,
            decoder=args.decoder, progress=not args.quiet, format=fmt,
        )
        announce_missing_extras()
        summary = tokenize_corpus(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print("blend:", " ".join(summary["blend"].values()), f"(eod_id {summary['eod_id']}, "
              f"text_vocab_size {summary['text_vocab_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
