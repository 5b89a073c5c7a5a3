"""The run section every stage's config starts with: one name per knob, for every trainer.

`RunSection` is the base class of every stage's run config (SigLIP-VQ, corpus tokenization, AR
pre-training/SFT, the diffusion decoder, GRPO), so `steps=`, `save_dir=`, `save_interval=` ... mean
the same thing, are checked the same way and are handled by the same checkpoint manager, metrics
logger and preemption path (training/checkpoint.py, metrics.py, preemption.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar, Optional

from megatron_xomni.dataclass_utils import check_numbers
from megatron_xomni.training import faults


EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_REQUEUE = 0, 1, 2, 3
"""Process exit codes of every stage: done, failed, bad input (one line, nothing started), preempted
and checkpointed (the sbatch template requeues the job)."""


class TrainingError(RuntimeError):
    """A failure that stops the run with one clear line (exit code 1)."""


class InputError(TrainingError):
    """Bad input found when the run starts (a path, a checkpoint that does not fit): exit code 2."""


@dataclass
class RunSection:
    """Knobs every stage shares.

    Subclasses name the function that runs them (`RUNNER`, "module:function", called with the config
    and returning an exit code) and whether they run one process per rank under torchrun
    (`DISTRIBUTED`); `python -m megatron_xomni.train` and `xomni submit` dispatch on these."""

    RUNNER: ClassVar[str] = ""
    DISTRIBUTED: ClassVar[bool] = True

    name: str = "run"
    """Run name (logs, SLURM job name)."""
    seed: int = 1234
    """Seed of initialisation, data order and sampling."""
    steps: int = 1000
    """Optimizer steps to run (a resumed run continues up to this many)."""
    save_dir: str = "runs/run"
    """Checkpoint root of this run; a run resumes from it automatically."""
    save_interval: int = 500
    """Steps between checkpoints (one is always written at the end and on preemption)."""
    keep_last: Optional[int] = 3
    """Checkpoints kept (None keeps all)."""
    log_interval: int = 10
    """Steps between console / TensorBoard / metrics.jsonl records."""
    debug_kill: str = ""
    """Testing aid: SIGKILL this process at POINT:STEP[@RANK] (training/faults.py), e.g. in_save:4."""

    def validate_run(self) -> None:
        """One-line ValueError for a bad run-section value (no process groups, no paths)."""
        check_numbers({"steps": self.steps, "save_interval": self.save_interval,
                       "log_interval": self.log_interval}, 1)
        check_numbers({"keep_last": self.keep_last}, 1, optional=True)
        check_numbers({"seed": self.seed}, 0)
        if not isinstance(self.save_dir, str) or not self.save_dir:
            raise ValueError(f"save_dir={self.save_dir!r}: give the run's checkpoint folder")
        faults.parse(self.debug_kill)

    def check_paths(self) -> None:
        """Local inputs exist (one line, InputError). Called when the job starts, on every rank
        before any process group; `xomni submit --dry-run` does not call it."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def run_stage(trainer) -> int:
    """setup() + run() of a trainer (anything with setup/run/close), then its logger closed and the
    process groups destroyed, however it ended; returns run()'s exit code."""
    from megatron_xomni.parallel import destroy_parallel

    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()
        destroy_parallel()
