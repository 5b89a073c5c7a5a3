"""Entry point: `python -m megatron_xomni.train RECIPE [key=value ...]` (under torchrun).

Exit codes: 0 finished, 3 preempted and checkpointed (requeue me), 2 bad config/input
(reported in one line before any process group starts), 1 other failure.
"""

from __future__ import annotations

import os
import sys

from megatron_xomni.device import announce_missing_extras
from megatron_xomni.training.trainer import EXIT_REQUEUE, InputError, TrainingError  # noqa: F401  (re-exported)

EXIT_CONFIG = 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from megatron_xomni.recipes import available_recipes

        print(__doc__)
        print("recipes: " + ", ".join(available_recipes()))
        return 0 if argv else EXIT_CONFIG
    from megatron_xomni.recipes import load_recipe
    from megatron_xomni.training.trainer import train

    try:
        cfg = load_recipe(argv[0], argv[1:])
        announce_missing_extras()
        from megatron_xomni.rl.trainer import GRPORunConfig, train_grpo

        if isinstance(cfg, GRPORunConfig):  # RL recipes run the GRPO loop
            return train_grpo(cfg)
        return train(cfg)
    except (ValueError, FileNotFoundError, TrainingError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same problem: say it once
            print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return EXIT_CONFIG if not isinstance(e, TrainingError) or isinstance(e, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
