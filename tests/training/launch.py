"""Launch the real trainer under torchrun from tests (subprocess, own process group, timeout)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_xomni.parallel.init import free_port


def torchrun_cmd(nproc: int, recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "megatron_xomni.train", recipe, *overrides]


def run_trainer(nproc: int, recipe: str, overrides: list[str], cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(torchrun_cmd(nproc, recipe, overrides), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_trainer(nproc: int, recipe: str, overrides: list[str], cwd) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(torchrun_cmd(nproc, recipe, overrides), cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_iteration(metrics: Path, iteration: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and any(json.loads(l)["iteration"] >= iteration for l in metrics.read_text().splitlines() if l):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited early with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"iteration {iteration} not reached")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def losses(metrics: Path) -> dict[int, float]:
    """Last logged loss per iteration (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in metrics.read_text().splitlines():
        if line:
            rec = json.loads(line)
            out[rec["iteration"]] = rec["train_loss"]
    return out
