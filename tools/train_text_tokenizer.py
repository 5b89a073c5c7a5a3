#!/usr/bin/env python
"""Build the text tokenizer folder the tokenization pipeline and the model use.

  # tiny preset: sentencepiece BPE trained on the built-in world's captions and QA text
  python tools/train_text_tokenizer.py world OUT_DIR [--vocab-size 512] [--num-samples 2000] [--seed 0]
  # sentencepiece BPE on your own text (one sample per line)
  python tools/train_text_tokenizer.py text OUT_DIR --text-file corpus.txt [--vocab-size 32000]
  # a local HF tokenizer folder (e.g. Qwen2.5-7B/): registers <SOM>, <EOM>, <IMAGE> and saves it
  python tools/train_text_tokenizer.py hf OUT_DIR --hf Qwen2.5-7B/

The folder loads with megatron_xomni.data.text_tokenizer.XOmniTextTokenizer.load and is what
tools/tokenize_corpus.py --text-tokenizer expects.
"""

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["world", "text", "hf"], help="what to build the tokenizer from")
    p.add_argument("out_dir", help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=512, help="sentencepiece vocabulary (upper bound)")
    p.add_argument("--num-samples", type=int, default=2000, help="world: images whose text is used")
    p.add_argument("--seed", type=int, default=0, help="world: seed of the samples")
    p.add_argument("--text-file", help="text: UTF-8 file, one training text per line")
    p.add_argument("--hf", help="hf: local folder with the HF tokenizer files")
    p.add_argument("--no-byte-fallback", action="store_true", help="sentencepiece: no byte pieces (unknown chars -> <unk>)")
    args = p.parse_args(argv)

    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts

    try:
        if args.source == "hf":
            if not args.hf:
                p.error("source hf needs --hf FOLDER")
            tok = XOmniTextTokenizer.from_hf(args.hf)
        else:
            if args.source == "world":
                texts = world_texts(args.num_samples, args.seed)
            else:
                if not args.text_file:
                    p.error("source text needs --text-file FILE")
                texts = Path(args.text_file).read_text(encoding="utf-8").splitlines()
            with tempfile.TemporaryDirectory() as tmp:
                model = train_sentencepiece(texts, Path(tmp) / "spm", args.vocab_size,
                                            byte_fallback=not args.no_byte_fallback)
                tok = XOmniTextTokenizer.from_sentencepiece(model)
        out = tok.save(args.out_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: vocab {tok.vocab_size}, special ids {tok.special_ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
