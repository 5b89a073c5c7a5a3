#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron: a shim for `xomni convert` (see --help)."""
import sys

from megatron_xomni.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
