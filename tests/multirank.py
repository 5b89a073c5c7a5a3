"""Run a function on N real ranks (gloo) from a test.

Ranks are forked from a forkserver that has already imported torch and megatron-core, so a
launch costs a fork instead of ~5 s of imports per rank. Every launch has a timeout (a hung
collective must fail the test, not CI) and tears the process groups down at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import signal
import time
import traceback

from megatron_xomni.parallel.init import free_port

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests._preload"])
    return _CTX


def _entry(fn, rank, world, port, queue, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        # Plain pickle (by value): torch.multiprocessing's reductions would share tensor storage
        # through a file descriptor that dies with this process before the parent reads it.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, then still tear down
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_xomni.parallel import destroy_parallel

            destroy_parallel()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return results by rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:  # killed or os._exit() without reporting (a crash, SIGKILL, ...)
                    errors.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout:.0f}s") from None
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _stop_helper(pid_attr: str, fd_attr: str, owner, timeout: float) -> None:
    """Close a multiprocessing helper's "alive" pipe (its signal to exit), wait for it, and kill
    it if something else still holds the pipe open. Attributes are CPython's (3.8-3.13)."""
    pid, fd = getattr(owner, pid_attr, None), getattr(owner, fd_attr, None)
    if pid is None:
        return
    if fd is not None:
        os.close(fd)
        setattr(owner, fd_attr, None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    setattr(owner, pid_attr, None)


def shutdown_helpers(timeout: float = 20.0) -> None:
    """Stop the forkserver (ranks here, tokenize workers elsewhere) and the resource tracker this
    process started: left alone they outlive the test session, reparented to init."""
    server = multiprocessing.forkserver._forkserver
    address = getattr(server, "_forkserver_address", None)
    _stop_helper("_forkserver_pid", "_forkserver_alive_fd", server, timeout)
    if address and os.path.exists(address):
        os.unlink(address)
    server._forkserver_address = None
    _stop_helper("_pid", "_fd", multiprocessing.resource_tracker._resource_tracker, timeout)
