#!/usr/bin/env python
"""Train the SigLIP-VQ tokenizer: a shim for `python -m megatron_xomni.training.siglip_vq_cli` (see --help)."""
import sys

from megatron_xomni.training.siglip_vq_cli import main

if __name__ == "__main__":
    sys.exit(main())
