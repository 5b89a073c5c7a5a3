"""One element of a sweep's SLURM job array, on every rank:

    python -m megatron_xomni.scaling.element SWEEP_FILE [INDEX]

INDEX defaults to $SLURM_ARRAY_TASK_ID. Runs the sweep's run INDEX exactly as `xomni train` would
(same exit codes: 3 asks the batch script to requeue, and the requeued element resumes from its
checkpoint); a run that is already finished exits 0 at once. Rank 0 records the attempt.
"""

from __future__ import annotations

import os
import sys
import time

from megatron_xomni.scaling.launch import check_saved_configs, record_attempt, run_state
from megatron_xomni.scaling.plan import PlanError, read_sweep
from megatron_xomni.training.run import EXIT_CONFIG


def _run(argv: list[str]) -> tuple[dict, int]:
    if not 1 <= len(argv) <= 2:
        raise PlanError("usage: python -m megatron_xomni.scaling.element SWEEP_FILE [INDEX]")
    index = argv[1] if len(argv) == 2 else os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None or not index.isdigit():
        raise PlanError(f"array index {index!r}: run as a job array element ($SLURM_ARRAY_TASK_ID) or give INDEX")
    runs = read_sweep(argv[0])["runs"]
    if int(index) >= len(runs) or runs[int(index)]["index"] != int(index):
        raise PlanError(f"{argv[0]} has no run {index} (it lists {len(runs)})")
    return runs[int(index)], int(index)


def main(argv=None) -> int:
    from megatron_xomni.train import main as train_main

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        run, index = _run(list(sys.argv[1:] if argv is None else argv))
    except PlanError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        check_saved_configs([run])
    except PlanError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if run_state(run) == "finished":
        if rank0:
            print(f"[scaling] run {index} ({run['name']}) is already finished: nothing to do", flush=True)
        return 0
    if rank0:
        print(f"[scaling] array element {index}: run {run['name']}", flush=True)
    start = time.time()
    rc = train_main([run["recipe"], *run["overrides"]])
    if rank0:
        record_attempt(run, start, rc, f"slurm job {os.environ.get('SLURM_JOB_ID', '?')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
