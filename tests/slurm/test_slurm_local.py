"""`xomni submit` (megatron_xomni/slurm/submit.py + train.sbatch) against a real SLURM cluster
(tools/slurm_local.sh start).

a. a 2-rank gloo job submitted through submit.py completes, its loss falls, a checkpoint exists;
b. a job signalled mid-run (SIGUSR1 to its steps, as --signal=USR1@T and preemption do) saves,
   requeues itself, resumes and ends with exactly the loss of the uninterrupted run (a);
c. --dry-run renders a script sbatch accepts, and an impossible layout is refused (exit 2)
   before sbatch is ever called.

The trainer is the real `megatron_xomni.train` (recipe tiny_pt) when it exists, else the stand-in
tests/slurm/fake_trainer.py with the same contract. Every wait has a timeout; jobs still queued
at the end are cancelled.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass(frozen=True)
class Backend:
    """Which trainer the jobs run and the overrides that make its runs short."""

    recipe: str
    extra_args: tuple[str, ...]  # submit.py options selecting the trainer
    iters: int                   # training iterations per run
    slow: tuple[str, ...]        # extra overrides for the run that gets preempted
    loss_ratio: float            # mean(last 3 losses) must be below this x mean(first 3)
    real: bool

    def overrides(self, root: Path, save_dir: Path) -> list[str]:
        common = [f"save_dir={save_dir}", f"steps={self.iters}"]
        if not self.real:
            return common
        # Synthetic token data (see the `root` fixture), small batches, a checkpoint mid-run.
        return [f'data.blend=["{root}/data/syn"]', f"data.cache_dir={root}/cache", *common,
                "save_interval=5", "log_interval=1", "optim.lr=3e-3", "schedule.warmup_steps=2",
                "data.global_batch_size=8", "data.micro_batch_size=2"]


# XOMNI_SLURM_TEST_TRAINER=fake forces the stand-in (to test the machinery alone).
_FORCE_FAKE = os.environ.get("XOMNI_SLURM_TEST_TRAINER") == "fake"
if importlib.util.find_spec("megatron_xomni.train") is not None and not _FORCE_FAKE:
    BACKEND = Backend("tiny_pt", (), iters=16, slow=(), loss_ratio=0.9, real=True)
else:  # the stand-in, until the real trainer exists
    BACKEND = Backend(
        "fake",
        ("--recipe-loader", "tests.slurm.fake_trainer:load_recipe",
         "--entry", "tests.slurm.fake_trainer"),
        iters=30, slow=("step_time=0.2",), loss_ratio=0.1, real=False,
    )


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo on PATH); CI runs `tools/slurm_local.sh start` first"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering (tools/slurm_local.sh start)"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        return f"no usable SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()!r}); " \
               "start one with tools/slurm_local.sh start"
    return None


_PROBLEM = _cluster_problem()
needs_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


# ---- helpers --------------------------------------------------------------------------------------
from megatron_xomni.slurm import submit as _SUBMIT  # noqa: E402


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`xomni submit` ARGS, run in this process (one megatron import for all calls, not one per
    call); `test_help_runs_as_a_script` covers the command-line entry itself."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _SUBMIT.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["submit.py", *args], rc, out.getvalue(), err.getvalue())


def submit_job(root: Path, save_dir: Path, *overrides: str) -> str:
    res = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", "--cpus-per-task", "1",
                 "--time", "00:10:00", *BACKEND.extra_args,
                 *BACKEND.overrides(root, save_dir), *overrides)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert job_id.isdigit(), res.stdout
    _JOBS.append(job_id)
    return job_id


_JOBS: list[str] = []


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Shared folder; with the real trainer it holds a small synthetic token corpus."""
    path = tmp_path_factory.mktemp("slurm")
    if BACKEND.real:
        from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens

        write_synthetic_tokens(path / "data" / "syn", 300, 512, 256, seed=0)
    return path


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    yield
    for job in _JOBS:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def log_text(save_dir: Path, job_id: str) -> str:
    logs = list((save_dir / "slurm" / "logs").glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else "(no log yet)"


def wait_final(job_id: str, save_dir: Path, timeout: float) -> dict[str, str]:
    """Poll until the job reaches a final state; fail (after cancelling it) on timeout."""
    deadline = time.monotonic() + timeout
    bumped_for = None
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        # SLURM holds a requeued job for ~2 min (BeginTime). Skip the hold, but only once the old
        # attempt is a couple of seconds gone: its revoked credential also rejects a new attempt
        # started within the same second, failing the job.
        if (info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime"
                and bumped_for != info.get("Restarts")):
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           check=True, capture_output=True, timeout=30)
            bumped_for = info.get("Restarts")
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s; log:\n{log_text(save_dir, job_id)[-3000:]}")


def read_metrics(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loss(row: dict) -> float:
    return row["train_loss"] if "train_loss" in row else row["loss"]


def final_loss(save_dir: Path) -> float:
    """Loss at the last iteration (a resumed run may log some iterations twice: take the last)."""
    rows = [r for r in read_metrics(save_dir) if r["iteration"] == BACKEND.iters]
    assert rows, f"no metrics for iteration {BACKEND.iters} in {save_dir}/metrics.jsonl"
    return _loss(rows[-1])


# ---- a. a job completes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(root):
    """One uninterrupted job: test a checks it, test b compares its final loss."""
    if _PROBLEM:
        pytest.skip(_PROBLEM)
    save_dir = root / "reference"
    job_id = submit_job(root, save_dir)
    info = wait_final(job_id, save_dir, timeout=150)
    return save_dir, job_id, info


@needs_cluster
@pytest.mark.timeout(200)
def test_job_completes_trains_and_checkpoints(reference_run):
    save_dir, job_id, info = reference_run
    log = log_text(save_dir, job_id)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} ({info.get('ExitCode')}):\n{log[-3000:]}"
    assert info["Restarts"] == "0"
    # Both ranks of the one torchrun under srun met through the c10d rendezvous: world size 2.
    assert re.search(r"world 2\b", log), log[-3000:]
    assert "attempt 0" in log and "trainer exited with code 0" in log, log[-3000:]

    rows = read_metrics(save_dir)
    assert len(rows) >= 6 and rows[-1]["iteration"] == BACKEND.iters, rows
    losses = [_loss(r) for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < BACKEND.loss_ratio * first, f"loss did not fall enough: {first:.4f} -> {last:.4f}"

    latest = save_dir / "latest_checkpointed_iteration.txt"
    assert latest.exists(), f"no checkpoint in {save_dir}: {sorted(os.listdir(save_dir))}"
    assert int(latest.read_text().strip()) == BACKEND.iters


# ---- b. preempted, requeued, resumed ----------------------------------------------------------------
@needs_cluster
@pytest.mark.timeout(330)
def test_preempted_job_requeues_and_resumes_to_the_same_loss(reference_run, root):
    ref_dir, _, ref_info = reference_run
    assert ref_info["JobState"] == "COMPLETED", "the reference run failed (see the test above)"
    save_dir = root / "preempted"
    job_id = submit_job(root, save_dir, *BACKEND.slow)

    # Wait until training is under way, then send what --signal=USR1@T sends at the time limit.
    deadline = time.monotonic() + 120
    while len(read_metrics(save_dir)) < 2:
        state = job_info(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job ended ({state}) before it could be signalled:\n{log_text(save_dir, job_id)[-3000:]}"
        assert time.monotonic() < deadline, "the job logged no training step within 120 s"
        time.sleep(0.2)
    seen_before_signal = max(r["iteration"] for r in read_metrics(save_dir))
    assert seen_before_signal < BACKEND.iters
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, capture_output=True, timeout=30)

    info = wait_final(job_id, save_dir, timeout=180)
    log = log_text(save_dir, job_id)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']}:\n{log[-4000:]}"
    assert info["Restarts"] == "1", f"expected exactly one requeue:\n{log[-4000:]}"
    assert "asked for a requeue" in log and "attempt 1" in log, log[-4000:]
    assert "resumed from" in log, log[-4000:]

    # The second attempt continued from the first one's checkpoint instead of starting over.
    iterations = [r["iteration"] for r in read_metrics(save_dir)]
    assert iterations.count(iterations[0]) == 1, f"an attempt restarted from scratch: {iterations}"
    assert iterations[-1] == BACKEND.iters, iterations
    assert int((save_dir / "latest_checkpointed_iteration.txt").read_text()) == BACKEND.iters

    assert final_loss(save_dir) == pytest.approx(final_loss(ref_dir), rel=1e-6, abs=0.0)


# ---- c. dry run and layout refusal (no cluster needed) ------------------------------------------------
def test_help_runs_as_a_script():
    res = subprocess.run([sys.executable, "-m", "megatron_xomni.cli", "submit", "--help"], capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    for needle in ("--nodes", "--gpus-per-node", "--ranks-per-node", "--dry-run", "--sbatch-arg",
                   "key=value", "Exit codes", "Examples"):
        assert needle in res.stdout, needle

def _script_part(stdout: str) -> str:
    return stdout.split("\n# would run:")[0]


def test_dry_run_renders_a_valid_script(tmp_path, root):
    save_dir = tmp_path / "run"
    res = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", "--dry-run",
                 *BACKEND.extra_args, *BACKEND.overrides(root, save_dir))
    assert res.returncode == 0, res.stderr
    script = _script_part(res.stdout)
    assert "# would run: sbatch --parsable " in res.stdout
    assert not save_dir.exists(), "--dry-run must not write anything"
    # Valid bash, every template placeholder filled, the SLURM options the machinery relies on.
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0
    assert not re.search(r"\$\{[a-z_]+\}", script), "unrendered placeholder"
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120", "#SBATCH --open-mode=append"):
        assert line in script, line
    assert "--nproc-per-node=2" in script and "--rdzv-backend=c10d" in script
    assert "--gpus-per-node" not in script, "a CPU job must not ask for GPUs"
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script
    assert f"--output={save_dir}/slurm/logs/%x-%j.out" in script

    gpu = submit(BACKEND.recipe, "--nodes", "2", "--gpus-per-node", "2", "--signal-lead", "300",
                 "--partition", "gpu", "--dry-run", *BACKEND.extra_args, *BACKEND.overrides(root, save_dir))
    assert gpu.returncode == 0, gpu.stderr
    gpu_script = _script_part(gpu.stdout)
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=2", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR1@300"):
        assert line in gpu_script, line
    assert "--nproc-per-node=2" in gpu_script and "world size 4" in gpu_script

    if _PROBLEM is None:  # sbatch itself parses the scripts and finds a slot, queueing nothing
        (save_dir / "slurm" / "logs").mkdir(parents=True)
        scripts = {"cpu": script}
        gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30)
        if "gpu" in gres.stdout:  # tools/slurm_local.sh with SLURM_LOCAL_GPUS=2 (one node only)
            one_node = submit(BACKEND.recipe, "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
                              *BACKEND.extra_args, *BACKEND.overrides(root, save_dir))
            assert one_node.returncode == 0, one_node.stderr
            scripts["gpu"] = _script_part(one_node.stdout)
        for kind, text in scripts.items():
            path = tmp_path / f"{kind}.sbatch"
            path.write_text(text)
            test = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True,
                                  text=True, timeout=30)
            assert test.returncode == 0, f"{kind}: {test.stderr}"


def test_invalid_layout_is_refused_before_sbatch(tmp_path, root):
    # An sbatch that records any call: the refusal must come before it.
    calls = tmp_path / "sbatch_calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 999\n")
    (bindir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    save_dir = tmp_path / "run"

    res = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", *BACKEND.extra_args,
                 *BACKEND.overrides(root, save_dir), "parallel.tensor_parallel=3", env=env)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "world size 2" in res.stderr and "3" in res.stderr, res.stderr
    assert res.stdout == ""
    assert not calls.exists(), "sbatch was called for an invalid layout"
    assert not save_dir.exists()

    # The same request with a layout that fits does reach sbatch (so the refusal was the layout).
    ok = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", *BACKEND.extra_args,
                *BACKEND.overrides(root, save_dir), "parallel.tensor_parallel=2", env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "999" and calls.read_text().startswith("--parsable ")


def test_time_limit_must_leave_room_for_the_warning(root, tmp_path):
    # 60 s limit with the default 120 s warning: the USR1 could never arrive in time.
    res = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", "--time", "00:01:00",
                 "--dry-run", *BACKEND.extra_args, *BACKEND.overrides(root, tmp_path / "run"))
    assert res.returncode == 2 and "--signal-lead" in res.stderr, res.stderr
    ok = submit(BACKEND.recipe, "--nodes", "1", "--ranks-per-node", "2", "--time", "1-00",
                "--signal-lead", "600", "--dry-run", *BACKEND.extra_args,
                *BACKEND.overrides(root, tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr
    assert "#SBATCH --time=1-00" in ok.stdout and "--shutdown-timeout=580" in ok.stdout


@pytest.mark.skipif(not BACKEND.real, reason="needs the real ARRunConfig (Transformer Engine check)")
def test_gpu_jobs_are_validated_for_the_compute_nodes(root, tmp_path):
    # Context parallelism needs Transformer Engine: fine on GPU nodes, impossible on CPU ranks,
    # whatever the submitting machine has.
    args = [*BACKEND.overrides(root, tmp_path / "run"), "parallel.context_parallel=2",
            "data.seq_length=64", "--nodes", "1", "--dry-run"]
    gpu = submit(BACKEND.recipe, "--gpus-per-node", "2", *args)
    assert gpu.returncode == 0, gpu.stderr
    cpu = submit(BACKEND.recipe, "--ranks-per-node", "2", *args)
    assert cpu.returncode == 2 and "context_parallel=2" in cpu.stderr, cpu.stderr


# ---- d. other stages: a tokenization job (one process) and a decoder job (2 ranks) --------------
@needs_cluster
@pytest.mark.skipif(not BACKEND.real, reason="needs the real stages")
@pytest.mark.timeout(400)
def test_tokenizer_stage_and_decoder_stage_jobs_complete(root):
    from megatron_xomni.data import write_world_corpus
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts

    write_world_corpus(root / "corpus", 24, seed=0, samples_per_shard=12)
    XOmniTextTokenizer.from_sentencepiece(train_sentencepiece(world_texts(200), root / "sp", vocab_size=512)).save(root / "text")
    jobs = {}
    for name, resources, overrides in (
        ("tiny_tokenize", ["--ranks-per-node", "1"],
         [f"corpus={root / 'corpus'}", f"text_tokenizer={root / 'text'}", "image_tokenizer=tiny", "progress=false"]),
        ("tiny_decoder", ["--ranks-per-node", "2"],
         ["steps=3", "image_tokenizer=tiny", "image_size=48", "batch_size=4", "vae_fit_steps=0", "sample_every=0",
          "save_interval=2", "log_interval=1", "schedule.warmup_steps=1"]),
    ):
        save_dir = root / f"stage_{name}"
        res = submit(name, "--nodes", "1", *resources, "--cpus-per-task", "2", "--time", "00:10:00",
                     f"save_dir={save_dir}", *overrides)
        assert res.returncode == 0, res.stderr
        jobs[name] = (res.stdout.strip(), save_dir)
        _JOBS.append(jobs[name][0])
    for name, (job_id, save_dir) in jobs.items():
        info = wait_final(job_id, save_dir, timeout=300)
        assert info["JobState"] == "COMPLETED", f"{name}: {info['JobState']}:\n{log_text(save_dir, job_id)[-3000:]}"
    tokens = jobs["tiny_tokenize"][1]
    assert (tokens / "world.json").is_file() and (tokens / "world_generation.bin").stat().st_size > 0
    decoder = jobs["tiny_decoder"][1]
    assert (decoder / "export" / "decoder_config.json").is_file()
    assert [r["iteration"] for r in read_metrics(decoder)][-1] == 3
