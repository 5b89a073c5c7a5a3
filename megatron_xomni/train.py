"""Entry point of every stage: `python -m megatron_xomni.train RECIPE [key=value ...]` (also
`xomni train`), under torchrun for the distributed stages.

The recipe's config type decides what runs (its RUNNER): AR pre-training/SFT, GRPO, the diffusion
decoder, SigLIP-VQ tokenizer training, corpus tokenization, the text tokenizer.
Exit codes: 0 finished, 3 preempted and checkpointed (requeue me), 2 bad config/input
(reported in one line before any process group starts), 1 other failure.
"""

from __future__ import annotations

import importlib
import os
import sys

from megatron_xomni.device import announce_missing_extras
from megatron_xomni.training.run import EXIT_CONFIG, EXIT_ERROR, InputError, TrainingError


def run_config(cfg) -> int:
    """Run a loaded config with its stage's runner; returns the exit code."""
    module, _, fn = type(cfg).RUNNER.partition(":")
    if not module:
        raise ValueError(f"{type(cfg).__name__} names no runner: it is not a stage config")
    return getattr(importlib.import_module(module), fn)(cfg)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from megatron_xomni.recipes import available_recipes

        print(__doc__)
        print("recipes: " + ", ".join(available_recipes()))
        return 0 if argv else EXIT_CONFIG
    from megatron_xomni.recipes import load_recipe

    try:
        cfg = load_recipe(argv[0], argv[1:])
        announce_missing_extras()
        return run_config(cfg)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem: say it once
            print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return EXIT_CONFIG if not isinstance(e, TrainingError) or isinstance(e, InputError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
