"""One preemption path for every trainer: SIGTERM/SIGUSR1 -> save -> exit 3 -> requeue.

SLURM's `--signal=USR1@T` (and a preemption's TERM) reach every rank. Each trainer asks
`agreed()` after every step; ranks agree by a MAX all-reduce so they stop at the same step, save
one checkpoint and exit with EXIT_REQUEUE, which the sbatch template turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch

from megatron_xomni.training.run import EXIT_OK, EXIT_REQUEUE  # noqa: F401  (re-exported)


class PreemptionSignal:
    """Remembers SIGTERM/SIGUSR1; ranks agree on it after each step (a collective when distributed)."""

    def __init__(self):
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def agreed(self, group=None) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item())
