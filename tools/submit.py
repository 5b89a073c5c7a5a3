#!/usr/bin/env python
"""Submit a recipe to SLURM: a shim for `xomni submit` (see --help)."""
import sys

from megatron_xomni.slurm.submit import main

if __name__ == "__main__":
    sys.exit(main())
