"""Deterministic fault injection for kill-and-resume tests (`debug_kill=POINT:STEP[@RANK]`).

Tests must kill a trainer at a known place, never on a timer. Every trainer calls `fire(point,
step, spec)` at its named points; when `spec` names that point and step (and this rank, or every
rank when no rank is given), the process SIGKILLs itself: no handler, no cleanup, exactly what a
node failure or an OOM killer does. Points:

- `after_step`: step STEP has finished (weights updated, metrics logged), nothing saved for it yet;
- `in_save`: the checkpoint of step STEP is written to its temporary folder but not yet published.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

POINTS = ("after_step", "in_save")


def parse(spec: str) -> Optional[tuple[str, int, Optional[int]]]:
    """'in_save:4@1' -> ('in_save', 4, 1); '' -> None. ValueError in one line for anything else."""
    if not spec:
        return None
    head, _, rank = spec.partition("@")
    point, _, step = head.partition(":")
    if point not in POINTS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"debug_kill={spec!r}: use POINT:STEP[@RANK] with POINT in {', '.join(POINTS)}")
    return point, int(step), int(rank) if rank else None


def fire(point: str, step: int, spec: str) -> None:
    parsed = parse(spec)
    if parsed is None:
        return
    want_point, want_step, want_rank = parsed
    rank = int(os.environ.get("RANK", "0"))
    if point == want_point and step == want_step and want_rank in (None, rank):
        os.kill(os.getpid(), signal.SIGKILL)
