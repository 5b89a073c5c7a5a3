"""The trainer, end to end under torchrun on CPU (gloo): exact resume after SIGKILL at TP=2 and
PP=2, resharding a TP=2 checkpoint to PP=2, NaN skipping, crash-safe saves, TensorBoard scalars,
and config errors before any process group."""

import json
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.multirank import run_ranks
from tests.training.launch import kill_group, losses, run_trainer, start_trainer, wait_for_iteration

ITERS = 12
COMMON = ["steps=12", "save_interval=4", "log_interval=1", "optim.lr=3e-3",
          "schedule.warmup_steps=2", "data.global_batch_size=8", "data.micro_batch_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens

    write_synthetic_tokens(root / "data" / "syn", 300, 512, 256, seed=0)
    return root


def _ov(root, save_dir, *extra):
    return [f'data.blend=["{root}/data/syn"]', f"data.cache_dir={root}/cache", f"save_dir={root}/{save_dir}", *COMMON, *extra]


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_sigkill_and_resume_is_bit_identical(data, layout):
    name = layout.split(".")[1].split("=")[0]
    ref = run_trainer(2, "tiny_pt", _ov(data, f"ref_{name}", layout), data)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = losses(data / f"ref_{name}" / "metrics.jsonl")
    assert sorted(expected) == list(range(1, ITERS + 1))
    assert expected[ITERS] < expected[1]  # it trains

    kill_at = random.Random().randint(5, 10)  # a random step, past at least one checkpoint
    proc = start_trainer(2, "tiny_pt", _ov(data, f"killed_{name}", layout), data)
    wait_for_iteration(data / f"killed_{name}" / "metrics.jsonl", kill_at, proc)
    kill_group(proc)
    resumed = run_trainer(2, "tiny_pt", _ov(data, f"killed_{name}", layout), data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = losses(data / f"killed_{name}" / "metrics.jsonl")
    assert got == expected, f"killed at {kill_at}: {got} != {expected}"


def test_tp2_checkpoint_continues_at_pp2(data):
    base = run_trainer(2, "tiny_pt", _ov(data, "tp2", "parallel.tensor_parallel=2", "steps=4"), data)
    assert base.returncode == 0, base.stderr[-3000:]
    shutil.copytree(data / "tp2", data / "tp2_to_pp2")
    (data / "tp2_to_pp2" / "metrics.jsonl").unlink()
    cont_tp = run_trainer(2, "tiny_pt", _ov(data, "tp2", "parallel.tensor_parallel=2", "steps=5"), data)
    cont_pp = run_trainer(2, "tiny_pt", _ov(data, "tp2_to_pp2", "parallel.pipeline_parallel=2", "steps=5"), data)
    assert cont_tp.returncode == 0 and cont_pp.returncode == 0, cont_pp.stderr[-3000:]
    a = losses(data / "tp2" / "metrics.jsonl")[5]
    b = losses(data / "tp2_to_pp2" / "metrics.jsonl")[5]
    assert abs(a - b) <= 1e-5, (a, b)


def test_nan_step_is_skipped_and_counted_and_tensorboard_has_scalars(data):
    out = run_trainer(2, "tiny_pt", _ov(data, "nan", "debug_inject_nonfinite_steps=[3]", "steps=6"), data)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(l) for l in (data / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["iteration"]: r["train_skipped_steps"] for r in recs}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    assert all(r["train_loss"] == r["train_loss"] for r in recs)  # no NaN reached the weights
    assert recs[-1]["iteration"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(data / "nan" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/text_loss", "train/image_loss", "train/lr", "train/grad_norm",
                "throughput/tokens_per_s", "throughput/tokens_per_s_per_gpu", "throughput/tflops_per_gpu",
                "throughput/mfu", "system/memory_gib", "train/consumed_samples", "train/skipped_steps"]:
        assert tag in tags, tag
    assert [e.value for e in acc.Scalars("train/skipped_steps")][-1] == 1


def test_config_errors_stop_before_training_in_one_line(data):
    t0 = time.time()
    import os

    # As torchrun would launch it on 6 ranks: the layout is refused before any process group.
    out = subprocess.run([sys.executable, "-m", "megatron_xomni.train", "tiny_pt", "parallel.tensor_parallel=3"],
                         capture_output=True, text=True, timeout=120, cwd=data, env={**os.environ, "WORLD_SIZE": "6"})
    assert out.returncode == 2
    err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "num_attention_heads=4 is not divisible by tensor_parallel=3" in err[0]
    out = subprocess.run([sys.executable, "-m", "megatron_xomni.train", "tiny_pt", "optim.lrr=1"],
                         capture_output=True, text=True, timeout=120, cwd=data)
    assert out.returncode == 2 and "unknown config key 'optim.lrr'" in out.stderr
    missing = run_trainer(1, "tiny_pt", _ov(data, "missing", 'data.blend=["nowhere/x"]'), data)
    assert missing.returncode != 0 and "nowhere/x.bin is missing" in missing.stderr


def _save_then_crash(rank, world, root):
    """Save iteration 1, then die (like SIGKILL) in the middle of writing iteration 2."""
    import os

    from megatron.core import dist_checkpointing

    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import model_sharded_state_dict

    pg = initialize_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    save_checkpoint(root, 1, model_sharded_state_dict(chunks), {"model_config": model_preset("tiny").to_dict()})
    real_save = dist_checkpointing.save

    def dying_save(sd, path, *a, **k):
        real_save(sd, path, *a, **k)  # files are on disk, the checkpoint is not yet published
        os._exit(9)

    dist_checkpointing.save = dying_save
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    save_checkpoint(root, 2, model_sharded_state_dict(chunks), {"model_config": model_preset("tiny").to_dict()})


def _load_latest(rank, world, root):
    from megatron_xomni.conversion.convert import load_megatron

    state, _ = load_megatron(root)
    return state["embedding.word_embeddings.weight"][:2, :4]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    with pytest.raises(RuntimeError):
        run_ranks(_save_then_crash, 1, str(tmp_path), timeout=120)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (tmp_path / "iter_0000002.tmp").exists() and not (tmp_path / "iter_0000002").exists()
    (w,) = run_ranks(_load_latest, 1, str(tmp_path))
    assert torch.isfinite(w).all()
