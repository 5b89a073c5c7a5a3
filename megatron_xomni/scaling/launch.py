"""`xomni scaling launch`: a sweep's runs one after another on this machine, or ONE SLURM job array.

A run is *finished* when its save_dir holds its final iteration (`latest_checkpointed_iteration.txt`
names its `steps`). A run folder whose saved run_config.json is not the config the sweep plans
(e.g. from an earlier plan into the same folder) is refused in one line. Launching skips finished runs; a run with an earlier checkpoint resumes from it
(the trainer's own resume), so a launch that was interrupted, or a job array element that was
preempted, continues where it stopped. Each run is exactly `xomni train RECIPE OVERRIDES...` with
the sweep's recipe and overrides.

Locally, one rank (the default) runs in this process (one Python start and one megatron import for
the whole sweep; each run still builds its own process groups, model and data), more ranks run
under torchrun, one run at a time. Each run's output goes to <save_dir>/train.log and every attempt
is appended to <save_dir>/scaling_attempts.jsonl (start time, seconds, exit code, where it ran).

On a cluster the pending runs become the elements of one job array through `xomni submit`'s
template and checks (slurm/submit.py `array_spec`); a frozen copy of the sweep file goes beside the
script and each element (`scaling/element.py`) picks its run from it by $SLURM_ARRAY_TASK_ID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from megatron_xomni.checkpointing import latest_iteration
from megatron_xomni.scaling.plan import PlanError
from megatron_xomni.training.run import EXIT_REQUEUE

ATTEMPTS_FILE = "scaling_attempts.jsonl"
LOG_FILE = "train.log"
ELEMENT_MODULE = "megatron_xomni.scaling.element"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def run_state(run: dict) -> str:
    """finished (the final iteration is saved), partial (an earlier one is) or new."""
    it = latest_iteration(run["save_dir"])
    if it is None:
        return "new"
    return "finished" if it >= run["steps"] else "partial"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_saved_configs(runs: list[dict]) -> None:
    """Refuse (PlanError) a run whose saved config (run_config.json, written when it started) is not
    the one its sweep plans: a sweep re-planned into the same folder must neither count old results
    as its own nor continue an old run with new settings."""
    from megatron_xomni.recipes import load_recipe

    for run in runs:
        path = Path(run["save_dir"]) / "run_config.json"
        if not path.exists():
            continue
        saved = _flat(json.loads(path.read_text()))
        planned = _flat(json.loads(load_recipe(run["recipe"], run["overrides"]).to_json()))
        differ = sorted(k for k in saved.keys() & planned.keys() if saved[k] != planned[k])
        if differ:
            raise PlanError(f"run {run['name']} in {run['save_dir']} was started with another config than the sweep "
                            f"plans ({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}): remove that "
                            "folder to run it again, or plan into another --out")


def record_attempt(run: dict, start: float, rc: int, where: str) -> None:
    """Append one attempt (wall time from `start`, exit code, where) to the run's attempts file."""
    path = Path(run["save_dir"]) / ATTEMPTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"start": datetime.fromtimestamp(start, timezone.utc).isoformat(timespec="seconds"),
           "seconds": round(time.time() - start, 3), "exit_code": rc, "where": where}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def final_validation(run: dict) -> Optional[dict]:
    """The run's last validation record (metrics.jsonl), or None."""
    path = Path(run["save_dir"]) / "metrics.jsonl"
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if "valid_loss" in rec:
                last = rec
    return last


def _last_error(log: Path) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
    errors = [l for l in lines if l.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def _run_in_process(run: dict, log: Path) -> int:
    """`xomni train RECIPE OVERRIDES` in this process as a one-rank world (fresh rendezvous port)."""
    from megatron_xomni.parallel import single_process_env
    from megatron_xomni.train import main as train_main

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    # The trainer turns SIGTERM/SIGUSR1 into "save and stop" for its run; afterwards they must end
    # this process again instead of setting a flag nobody reads.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    # torch.distributed.init_process_group wraps sys.excepthook in a "[rankN]: " prefixer each time:
    # without this, the 12th run's traceback would carry twelve prefixes.
    excepthook = sys.excepthook
    for k in _DIST_ENV:
        os.environ.pop(k, None)
    single_process_env()
    try:
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            return train_main([run["recipe"], *run["overrides"]])
    finally:
        sys.excepthook = excepthook
        for sig, h in handlers.items():
            signal.signal(sig, h)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_torchrun(run: dict, ranks: int, log: Path) -> int:
    from megatron_xomni.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", "-m", "megatron_xomni.train", run["recipe"], *run["overrides"]]
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _describe(run: dict) -> str:
    return (f"{run['steps']} steps x {run['global_batch_size']} x {run['seq_length']} tokens "
            f"(N={run['params']:.3g}, D={run['tokens']:.3g}, C={run['flops']:.3g})")


def launch_local(sweep: dict, ranks: int = 1, in_process: Optional[bool] = None,
                 out: Callable[[str], None] = print) -> int:
    """Run every unfinished run, one after another; returns 0, or the failed run's exit code."""
    if ranks != sweep["world_size"]:
        raise PlanError(f"the sweep was planned and validated for world size {sweep['world_size']}, not {ranks}: "
                        f"launch with --ranks {sweep['world_size']}, or plan it again with --ranks {ranks}")
    in_process = ranks == 1 if in_process is None else in_process
    if in_process and ranks != 1:
        raise PlanError("in-process runs have one rank: drop --in-process or use --ranks 1")
    if in_process and "WORLD_SIZE" in os.environ:
        raise PlanError("xomni scaling launch runs its own ranks: start it without torchrun")
    runs = sweep["runs"]
    check_saved_configs(runs)
    todo = [r for r in runs if run_state(r) != "finished"]
    out(f"[scaling] {sweep['name']}: {len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to run "
        f"({'in this process' if in_process else f'torchrun x {ranks} ranks'})")
    for k, run in enumerate(todo, 1):
        state = run_state(run)
        log = Path(run["save_dir"]) / LOG_FILE
        log.parent.mkdir(parents=True, exist_ok=True)
        out(f"[scaling] [{k}/{len(todo)}] {run['name']}: {_describe(run)}"
            + (" (resuming)" if state == "partial" else ""))
        start = time.time()
        rc = _run_in_process(run, log) if in_process else _run_torchrun(run, ranks, log)
        record_attempt(run, start, rc, "local" if in_process else f"local torchrun x {ranks}")
        if rc == EXIT_REQUEUE:
            out(f"[scaling] run {run['name']} was interrupted and saved at iteration {latest_iteration(run['save_dir'])}: "
                "launch again to resume it (finished runs are skipped)")
            return rc
        if rc != 0 or run_state(run) != "finished":
            out(f"[scaling] run {run['name']} failed (exit code {rc}): {_last_error(log)}; log {log}. "
                "Launch again after fixing it: finished runs are skipped, this one resumes")
            return rc or 1
        v = final_validation(run) or {}
        out(f"[scaling]     done in {time.time() - start:.1f} s: validation text {v.get('valid_text_loss', float('nan')):.4f}, "
            f"image {v.get('valid_image_loss', float('nan')):.4f}")
    return 0


def frozen_copy(sweep: dict, sweep_file: Path) -> tuple[Path, str]:
    """(path, text) of the sweep's frozen copy that a job array reads: <sweep dir>/slurm/sweep-<hash>.json,
    so editing or re-planning the sweep file cannot change what a queued element runs."""
    text = json.dumps(sweep, indent=1) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Path(sweep_file).resolve().parent / "slurm" / f"sweep-{digest}.json", text


def launch_slurm(sweep: dict, sweep_file: Path, args, dry_run: bool = False,
                 max_parallel: Optional[int] = None) -> int:
    """Submit the unfinished runs as one job array (`args`: submit.py's resource options). Like
    `xomni submit`, only the job id (or the dry run's script) goes to stdout."""
    from megatron_xomni.slurm import submit

    runs = sweep["runs"]
    check_saved_configs(runs)
    todo = [r for r in runs if run_state(r) != "finished"]
    if not todo:
        print(f"[scaling] {sweep['name']}: all {len(runs)} runs finished, nothing to submit", file=sys.stderr)
        return 0
    frozen, text = frozen_copy(sweep, sweep_file)
    try:
        spec = submit.array_spec(args, [(r["recipe"], r["overrides"]) for r in todo], [r["index"] for r in todo],
                                 job_name=sweep["name"], run_dir=frozen.parent, entry_module=ELEMENT_MODULE,
                                 entry_file=frozen, max_parallel=max_parallel, world_size=sweep["world_size"])
    except submit.SubmitError as e:
        raise PlanError(str(e)) from None
    print(f"[scaling] {sweep['name']}: {len(runs) - len(todo)} of {len(runs)} runs finished; "
          f"{'would submit' if dry_run else 'submitting'} {len(todo)} as job array {spec.array}", file=sys.stderr)
    return submit.submit_spec(spec, dry_run, files={frozen: text}, prog="xomni scaling launch")
