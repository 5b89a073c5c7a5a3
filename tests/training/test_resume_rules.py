"""Resuming in another layout or with changed settings, config checks, orphans and unsafe checkpoints.

- a distributed-optimizer checkpoint saved at TP2 resumes at PP2 and at DP2 with Adam's step and
  moments equal tensor by tensor, and continues like the uninterrupted TP2 run;
- a lower optim.lr is applied (and said), a larger `steps` keeps the sample order, a changed blend
  is refused in one line before any process group;
- bad counts and intervals are refused before any process group;
- a trainer SIGKILLed in the middle of a save leaves no process behind;
- a crafted checkpoint runs nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.multirank import run_ranks
from tests.training.launch import torchrun_cmd

BASE = ["schedule.style=constant", "schedule.warmup_steps=0", "save_interval=3", "log_interval=1",
        "data.global_batch_size=8", "data.micro_batch_size=2", "optim.lr=3e-3", "optim.use_distributed_optimizer=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens

    root = tmp_path_factory.mktemp("resume")
    write_synthetic_tokens(root / "data" / "syn", 300, 512, 256, seed=0)
    write_synthetic_tokens(root / "data" / "other", 100, 512, 256, seed=5)
    return root


def _ov(root: Path, save: str, *extra) -> list[str]:
    return [f'data.blend=["{root}/data/syn"]', f"data.cache_dir={root}/cache", f"save_dir={root}/{save}", *BASE, *extra]


def _cfg(overrides):
    from megatron_xomni.recipes import load_recipe

    return load_recipe("tiny_pt", overrides)


def _adam_steps(optimizer) -> list[float]:
    return [float(st["step"]) for o in optimizer.chained_optimizers for st in o.optimizer.state.values()]


def _train(rank, world, overrides):
    from megatron_xomni.training.trainer import train

    return train(_cfg(overrides))


def _resume_dump_continue(rank, world, overrides, dump_dir):
    """Resume (any layout), write the loaded state back out in model space, then train on."""
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.training.trainer import Trainer

    trainer = Trainer(_cfg(overrides))
    trainer.setup()
    loaded_steps = _adam_steps(trainer.optimizer)
    save_checkpoint(dump_dir, trainer.state.iteration, trainer._sharded_state(), {})
    code = trainer.run()
    trainer.close()
    return code, loaded_steps, _adam_steps(trainer.optimizer)


def _plain(rank, world, path):
    from megatron.core import dist_checkpointing

    from megatron_xomni import safe_loading
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    safe_loading.install()
    return dist_checkpointing.load_plain_tensors(path)


def _losses(path: Path) -> dict[int, float]:
    return {r["iteration"]: r["train_loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_distributed_optimizer_checkpoint_reshards_from_tp2_to_pp2_and_dp2(data):
    tp2 = ["parallel.tensor_parallel=2"]
    run_ranks(_train, 2, _ov(data, "uninterrupted", "steps=6", *tp2))
    run_ranks(_train, 2, _ov(data, "tp2", "steps=3", *tp2))
    saved = run_ranks(_plain, 1, str(data / "tp2" / "iter_0000003"))[0]
    moments = [k for k in saved if k.startswith("optimizer.state.exp_avg")]
    assert len(moments) > 20
    expected = _losses(data / "uninterrupted" / "metrics.jsonl")
    for name, layout in (("pp2", "parallel.pipeline_parallel=2"), ("dp2", "parallel.tensor_parallel=1")):
        shutil.copytree(data / "tp2", data / name)
        (data / name / "metrics.jsonl").unlink()
        results = run_ranks(_resume_dump_continue, 2, _ov(data, name, "steps=6", layout), str(data / f"{name}_dump"))
        for code, loaded_steps, final_steps in results:
            assert code == 0
            assert loaded_steps and set(loaded_steps) == {3.0}  # Adam's step survives the reshard
            assert set(final_steps) == {6.0}  # one step per optimizer step (no shared step tensor)
        dumped = run_ranks(_plain, 1, str(data / f"{name}_dump" / "iter_0000003"))[0]
        for key in moments:
            assert torch.equal(saved[key], dumped[key]), (name, key)
        got = _losses(data / name / "metrics.jsonl")
        assert sorted(got) == [4, 5, 6]
        for it in (4, 5, 6):
            assert abs(got[it] - expected[it]) <= 2e-5, (name, it, got[it], expected[it])


@pytest.mark.slow
def test_longer_run_keeps_the_sample_order_and_lower_lr_is_applied(data):
    base = ["parallel.tensor_parallel=1"]
    run_ranks(_train, 2, _ov(data, "eight", "steps=8", *base))
    run_ranks(_train, 2, _ov(data, "four_then_eight", "steps=4", *base))
    run_ranks(_train, 2, _ov(data, "four_then_eight", "steps=8", *base))
    assert _losses(data / "four_then_eight" / "metrics.jsonl") == _losses(data / "eight" / "metrics.jsonl")

    # resume the same 4-step run with a lower lr through the real command line: said in one line, applied
    run_ranks(_train, 2, _ov(data, "lower_lr", "steps=4", *base))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(torchrun_cmd(2, "tiny_pt", _ov(data, "lower_lr", "steps=6", "optim.lr=1e-3", *base)),
                         cwd=data, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if "applying changed settings" in l]
    assert len(lines) == 1 and "optim.lr 0.003 -> 0.001" in lines[0] and "steps 4 -> 6" in lines[0], out.stdout[-2000:]
    recs = [json.loads(l) for l in (data / "lower_lr" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["train_lr"]) for r in recs[-2:]] == [(5, 1e-3), (6, 1e-3)]
    assert recs[-1]["train_loss"] != _losses(data / "eight" / "metrics.jsonl")[6]


def _no_pg_run(root: Path, save: str, *extra) -> subprocess.CompletedProcess:
    """The trainer as torchrun starts rank 0 of 2, but alone: reaching a process group would hang it."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_xomni.train", "tiny_pt", *_ov(root, save, *extra)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _error_lines(proc) -> list[str]:
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


@pytest.mark.slow
def test_changed_blend_and_bad_values_are_refused_before_process_groups(data):
    run_ranks(_train, 2, _ov(data, "plan", "steps=3", "parallel.tensor_parallel=2"))
    t0 = time.time()
    out = _no_pg_run(data, "plan", "steps=6", f'data.blend=["{data}/data/other"]')
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = _error_lines(out)
    assert "data.blend changed from" in line and "data.allow_plan_change=true" in line
    for extra, field in ((["data.global_batch_size=16"], "data.global_batch_size"), (["seed=7"], "seed"),
                         (["data.seq_length=32"], "data.seq_length"),
                         (["optim.use_distributed_optimizer=false"], "optim.use_distributed_optimizer"),
                         (["trainable=vision"], "trainable")):
        out = _no_pg_run(data, "plan", "steps=6", *extra)
        assert out.returncode == 2 and len(_error_lines(out)) == 1 and f"{field} changed from" in out.stderr, out.stderr[-1500:]
    for extra, text in ((["keep_last=-5"], "keep_last=-5 must be >= 1"), (["save_interval=0"], "save_interval=0 must be >= 1"),
                        (["log_interval=0"], "log_interval=0 must be >= 1"),
                        (["steps=8", "schedule.warmup_steps=10"], "schedule.warmup_steps=10 must be smaller than steps=8"),
                        (["train_iters=8"], "`train_iters` is now `steps`"), (["optim=1"], "optim is a section"),
                        (["optim.lr=none"], "optim.lr=None"), (["steps=-1"], "steps=-1 must be >= 1")):
        out = _no_pg_run(data, "fresh", *extra)
        assert out.returncode == 2, (extra, out.stderr[-1500:])
        (line,) = _error_lines(out)
        assert text in line, (extra, line)
    # an accepted plan change resumes (and says so)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(torchrun_cmd(2, "tiny_pt", _ov(data, "plan", "steps=4", "parallel.tensor_parallel=2",
                                                       "data.global_batch_size=16", "data.allow_plan_change=true")),
                        cwd=data, env=env, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0 and "data plan changed" in ok.stdout, ok.stderr[-2000:]
    assert time.time() - t0 < 400


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:120]}")
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_save_leaves_no_process(data):
    marker = f"{data}/orphans"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(torchrun_cmd(2, "tiny_pt", _ov(data, "orphans", "steps=6", "debug_kill=in_save:6")),
                         cwd=data, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode != 0 and (data / "orphans" / "iter_0000006.tmp").exists()
    assert (data / "orphans" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    deadline = time.time() + 5
    while _leftovers(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert _leftovers(marker) == []


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _load_model(rank, world, root):
    from megatron_xomni.conversion.convert import load_megatron

    try:
        load_megatron(root)
    except ValueError as e:
        return type(e).__name__, str(e)
    return "loaded", ""


def _dcp_bytes_roundtrip(rank, world, path, marker):
    """A torch DCP checkpoint (the decoder's and tokenizer's format) whose byte object is a payload."""
    import torch.distributed.checkpoint as dcp

    from megatron_xomni import safe_loading
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    dcp.save({"obj": _Payload(marker), "t": torch.ones(2)}, checkpoint_id=path)
    target = {"obj": None, "t": torch.zeros(2)}
    try:
        safe_loading.dcp_load(target, path)
    except ValueError as e:
        return type(e).__name__, str(e)
    return "loaded", ""


def test_crafted_checkpoint_runs_nothing(data, tmp_path):
    run_ranks(_train, 1, _ov(data, "evil", "steps=3"))
    marker = tmp_path / "pwned"
    meta = data / "evil" / "iter_0000003" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(marker)))
    (kind, msg), = run_ranks(_load_model, 1, str(data / "evil"))
    assert kind == "UnsafeCheckpointError" and "not checkpoint metadata" in msg and "\n" not in msg
    out = _no_pg_run(data, "evil", "steps=6")  # resuming it from the command line: one line, exit 2
    assert out.returncode == 2 and len(_error_lines(out)) == 1 and "not checkpoint metadata" in out.stderr
    ((kind, msg),) = run_ranks(_dcp_bytes_roundtrip, 1, str(tmp_path / "dcp"), str(marker))
    assert kind == "UnsafeCheckpointError" and "not plain data" in msg
    assert not marker.exists()
