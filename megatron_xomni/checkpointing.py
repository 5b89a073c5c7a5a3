"""Atomic megatron-core distributed checkpoints.

Layout of a checkpoint root:
    <root>/iter_0000120/            a complete dist-ckpt (+ metadata JSON files)
    <root>/latest_checkpointed_iteration.txt   the newest *complete* iteration

A save writes `iter_N.tmp/`, renames it to `iter_N/` only after every rank finished, and only
then rewrites the `latest` file (write + os.replace). A crash at any point leaves `latest`
pointing at the previous complete checkpoint; stale `.tmp` folders are removed on the next save.
Saving an iteration that already exists (a resumed run saving its start step again) first moves
the old folder aside to `iter_N.old`; a crash before the new one is in place leaves `latest`
naming a missing `iter_N`, and `resolve_checkpoint` puts `iter_N.old` back (saying so in one line).

Loading goes through `megatron_xomni.safe_loading`: no checkpoint file can run code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

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


def _queue_server_init() -> None:
    """Runs in the results-queue server process: it must die with the trainer that started it.

    It is forked from the trainer and lives only to serve the trainer's saves. A preemption's
    SIGUSR1/SIGTERM reaches every process of the job: the server must survive them (the trainer is
    about to save through it), so it ignores both; it dies when its parent dies (PR_SET_PDEATHSIG),
    so a SIGKILLed trainer leaves no orphan holding gigabytes."""
    import ctypes
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() == 1:  # the trainer died before the line above took effect
        os._exit(0)


def use_orphan_free_writer() -> None:
    """megatron-core's async file writer makes its results queue with a *spawn* Manager, which
    re-imports the launching script (a fresh interpreter, 5-16 s, and a crash in scripts without
    a __main__ guard). A fork-context Manager serves the same queue in ~0.2 s; its server process
    dies with the trainer (see _queue_server_init)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("fork"))
        manager.start(initializer=_queue_server_init)
        filesystem_async._results_queue = manager.Queue()
        filesystem_async._xomni_queue_manager = manager  # keep it alive as long as the queue


def save_checkpoint(
    root,
    iteration: int,
    payload: Union[dict, Callable[[Path], None]],
    metadata: Optional[dict[str, dict]] = None,
    keep_last: Optional[int] = None,
    per_rank: Optional[dict] = None,
    before_publish: Optional[Callable[[], None]] = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder.

    `payload` is a megatron-core sharded state dict (written with dist_checkpointing.save), or a
    callable that writes any payload into the temporary folder it is given (collective too).

    `per_rank` (tensors/dicts, e.g. RNG states) is written by each rank to
    `rank_state/<rank>.pt` inside the same atomic folder. `before_publish` runs on every rank once
    its files are written, before the folder is published (fault-injection tests)."""
    from megatron.core import dist_checkpointing

    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be None (keep all) or >= 1")
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    if callable(payload):
        payload(tmp)
    else:
        use_orphan_free_writer()
        dist_checkpointing.save(payload, str(tmp))
    if per_rank is not None:
        (tmp / "rank_state").mkdir(exist_ok=True)
        torch.save(per_rank, tmp / "rank_state" / f"{_rank()}.pt")
    if before_publish is not None:
        before_publish()
    _barrier()
    if _rank() == 0:
        for name, payload in (metadata or {}).items():
            (tmp / f"{name}.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
        old = final.with_name(final.name + ".old")
        if final.exists():  # re-saving an iteration: keep the old copy until the new one is published
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, str(iteration))
        shutil.rmtree(old, ignore_errors=True)
        if keep_last:
            prune(root, keep_last)
    _barrier()
    return final


def complete_iterations(root) -> list[Path]:
    """Published iteration folders, oldest first."""
    return sorted(p for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit())


def prune(root, keep_last: int) -> None:
    """Delete all but the newest `keep_last` published iterations; never the one `latest` names."""
    keep = latest_iteration(root)
    done = complete_iterations(root)
    for old in done[:-keep_last]:
        if keep is None or old != iteration_dir(root, keep):
            shutil.rmtree(old, ignore_errors=True)


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
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir() and latest_iteration(root) == iteration:
        # a re-save of this iteration was killed between moving the old copy aside and publishing;
        # every rank may get here (before process groups exist): the rename is atomic, one wins
        try:
            os.replace(old, path)
            print(f"[xomni] restored {path} from {old.name} (a save of it was interrupted)", flush=True)
        except FileNotFoundError:
            pass
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path/iteration")
    return path


def load_checkpoint(ckpt_dir, sharded_state_dict: dict, partial: bool = False) -> dict:
    """Collective load of a dist-ckpt folder into the given sharded state dict's layout.

    Every requested tensor must exist in the checkpoint. `partial=True` allows the checkpoint
    to hold more than requested (e.g. loading only the model from a training checkpoint)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_xomni import safe_loading

    safe_loading.install()
    safe_loading.check_metadata(ckpt_dir)
    return dist_checkpointing.load(
        sharded_state_dict,
        str(ckpt_dir),
        strict=StrictHandling.RAISE_UNEXPECTED if partial else StrictHandling.RAISE_ALL,
    )


def load_rank_state(ckpt_dir) -> Optional[dict]:
    """This rank's `per_rank` payload (weights_only: nothing in a checkpoint is executed)."""
    path = Path(ckpt_dir) / "rank_state" / f"{_rank()}.pt"
    return torch.load(path, weights_only=True) if path.exists() else None
