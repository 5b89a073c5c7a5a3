"""Stand-in for `megatron_xomni.train` with the same contract, to test the SLURM machinery alone.

    torchrun ... -m tests.slurm.fake_trainer RECIPE [key=value ...]

Every rank takes part in real gloo all-reduces (data-parallel SGD on a least-squares problem
whose data depend only on the iteration, so a resumed run retraces an uninterrupted one exactly).
Rank 0 writes <save_dir>/metrics.jsonl ({"iteration", "train_loss"} per step, as the real trainer) and checkpoints
(<save_dir>/iter_XXXXXXX.pt + latest_checkpointed_iteration.txt). SIGTERM/SIGUSR1: all ranks agree
at the end of the step, save, and exit with EXIT_REQUEUE (3). On start it resumes from save_dir.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_xomni.parallel import ParallelConfig

EXIT_REQUEUE = 3
DIM = 8


@dataclass
class FakeRunConfig:
    """The parts of ARRunConfig that tools/submit.py and the SLURM tests use."""

    name: str = "fake"
    """Run name (SLURM job name)."""
    save_dir: str = "runs/fake"
    """Checkpoint root; metrics.jsonl lives here too."""
    steps: int = 30
    """Iterations to train."""
    save_interval: int = 10
    """Checkpoint every this many iterations (and at the end, and on a signal)."""
    step_time: float = 0.0
    """Extra seconds per step, so a test can signal the job mid-run."""
    lr: float = 0.05
    """SGD learning rate."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout; only its divisibility by the world size matters here."""

    def validate(self, world_size: int) -> None:
        self.parallel.validate_world(world_size)


def load_recipe(name: str, overrides: list[str]) -> FakeRunConfig:
    if name != "fake":
        raise ValueError(f"unknown recipe {name!r}: the fake trainer only has 'fake'")
    cfg = FakeRunConfig()
    for item in overrides:
        key, sep, value = item.partition("=")
        target, attr = cfg, key
        if key.startswith("parallel."):
            target, attr = cfg.parallel, key.split(".", 1)[1]
        if not sep or not hasattr(target, attr):
            raise ValueError(f"override {item!r}: unknown key (known: {sorted(vars(cfg))})")
        current = getattr(target, attr)
        setattr(target, attr, type(current)(value) if current is not None else int(value))
    return cfg


def _batch(iteration: int, rank: int, world: int):
    import torch

    g = torch.Generator().manual_seed(1000 + iteration)  # same global batch on every attempt
    x = torch.randn(8 * world, DIM, generator=g)
    w_true = torch.arange(1, DIM + 1, dtype=torch.float32) / DIM
    y = x @ w_true
    return x[rank::world], y[rank::world]  # this rank's shard


def _save(save_dir: Path, iteration: int, w) -> None:
    import torch

    torch.save({"w": w, "iteration": iteration}, save_dir / f"iter_{iteration:07d}.pt")
    tmp = save_dir / "latest_checkpointed_iteration.txt.tmp"
    tmp.write_text(str(iteration))
    os.replace(tmp, save_dir / "latest_checkpointed_iteration.txt")  # atomic: never half-written


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    cfg = load_recipe(argv[0], argv[1:])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg.validate(world)
    torch.set_num_threads(1)
    save_dir = Path(cfg.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    stop = {"sig": 0}

    def on_signal(signum, frame):  # idempotent: SLURM and torchrun may both deliver it
        stop["sig"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)

    w, start = torch.zeros(DIM), 0
    latest = save_dir / "latest_checkpointed_iteration.txt"
    if latest.exists():
        start = int(latest.read_text())
        w = torch.load(save_dir / f"iter_{start:07d}.pt", weights_only=True)["w"]
        if rank == 0:
            print(f"resumed from iteration {start}", flush=True)

    if rank == 0:
        print(f"fake trainer: world {world}", flush=True)
    metrics = open(save_dir / "metrics.jsonl", "a") if rank == 0 else None
    for it in range(start + 1, cfg.steps + 1):
        x, y = _batch(it, rank, world)
        err = x @ w - y
        grad = 2 * x.T @ err / (len(y) * world)
        stats = torch.cat([grad, (err**2).sum().reshape(1) / (len(y) * world)])
        dist.all_reduce(stats)  # sum of shard gradients and losses = full-batch values
        w = w - cfg.lr * stats[:DIM]
        if metrics:
            metrics.write(json.dumps({"iteration": it, "train_loss": float(stats[DIM])}) + "\n")
            metrics.flush()
        time.sleep(cfg.step_time)
        # All ranks must stop at the same iteration: agree on "anyone got a signal".
        flag = torch.tensor([float(stop["sig"])])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() or it % cfg.save_interval == 0 or it == cfg.steps:
            if rank == 0:
                _save(save_dir, it, w)
            dist.barrier()
        if flag.item():
            if rank == 0:
                print(f"signal {int(flag.item())} at iteration {it}: saved, exiting {EXIT_REQUEUE}",
                      flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    if rank == 0:
        print(f"finished {cfg.steps} iterations", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
