"""One preemption path for every trainer: SIGTERM/SIGUSR1 -> save -> exit 3 -> requeue.

SLURM's `--signal=USR1@T` (and a preemption's TERM) reach every rank. Each trainer asks
`agreed()` after every step; ranks agree by a MAX all-reduce so they stop at the same step, save
one checkpoint and exit with EXIT_REQUEUE, which the sbatch template turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

import torch

from megatron_xomni.training import faults
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


def end_of_step(step: int, run, preempt: PreemptionSignal, save: Callable[[], object]) -> bool:
    """What every trainer does after step `step` of a run section `run`: the `after_step` fault point,
    the ranks' preemption agreement, a checkpoint when due (save_interval, the last step, a signal).
    Returns True when the run must now exit with EXIT_REQUEUE."""
    faults.fire("after_step", step, run.debug_kill)
    preempted = preempt.agreed()
    if preempted or step % run.save_interval == 0 or step == run.steps:
        save()
    return preempted
