"""Atomic megatron-core distributed checkpoints.

Layout of a checkpoint root:
    <root>/iter_0000120/            a complete dist-ckpt (+ metadata JSON files)
    <root>/latest_checkpointed_iteration.txt   the newest *complete* iteration

A save writes `iter_N.tmp/`, renames it to `iter_N/` only after every rank finished, and only
then rewrites the `latest` file (write + os.replace). A crash at any point leaves `latest`
pointing at the previous complete checkpoint; stale `.tmp` folders are removed on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

LATEST = "latest_checkpointed_iteration.txt"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> Optional[int]:
    path = Path(root) / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} is corrupt ({text!r}): delete it or point it at an iter_* folder")
    return int(text)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fork_results_queue() -> None:
    """megatron-core's async file writer makes its results queue with a *spawn* Manager, which
    re-imports the launching script (a fresh interpreter, 5-16 s, and a crash in scripts without
    a __main__ guard). A fork-context Manager serves the same queue in ~0.2 s."""
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save_checkpoint(
    root,
    iteration: int,
    sharded_state_dict: dict,
    metadata: Optional[dict[str, dict]] = None,
    keep_last: Optional[int] = None,
    per_rank: Optional[dict] = None,
) -> Path:
    """Collective: every rank calls it with its sharded state dict. Returns the final folder.

    `per_rank` (tensors/dicts, e.g. RNG states) is written by each rank to
    `rank_state/<rank>.pt` inside the same atomic folder."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _fork_results_queue()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    if per_rank is not None:
        (tmp / "rank_state").mkdir(exist_ok=True)
        torch.save(per_rank, tmp / "rank_state" / f"{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        for name, payload in (metadata or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, str(iteration))
        if keep_last:
            done = sorted(p for p in root.glob("iter_*") if not p.name.endswith(".tmp"))
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_metadata(ckpt_dir, name: str) -> Optional[dict]:
    path = Path(ckpt_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def resolve_checkpoint(root, iteration: Optional[int] = None) -> Path:
    """The folder to load: `iteration`, else the one `latest` names. Clear error when missing."""
    root = Path(root)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(
                f"no checkpoint in {root}: {LATEST} is missing (convert or train one first)"
            )
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path/iteration")
    return path


def load_checkpoint(ckpt_dir, sharded_state_dict: dict, partial: bool = False) -> dict:
    """Collective load of a dist-ckpt folder into the given sharded state dict's layout.

    Every requested tensor must exist in the checkpoint. `partial=True` allows the checkpoint
    to hold more than requested (e.g. loading only the model from a training checkpoint)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    return dist_checkpointing.load(
        sharded_state_dict,
        str(ckpt_dir),
        strict=StrictHandling.RAISE_UNEXPECTED if partial else StrictHandling.RAISE_ALL,
    )


def load_rank_state(ckpt_dir) -> Optional[dict]:
    """This rank's `per_rank` payload (weights_only: nothing in a checkpoint is executed)."""
    path = Path(ckpt_dir) / "rank_state" / f"{_rank()}.pt"
    return torch.load(path, weights_only=True) if path.exists() else None
