"""The trainer, end to end under torchrun on CPU (gloo): exact resume after SIGKILL at TP=2 and
PP=2, resharding a TP=2 checkpoint to PP=2, NaN skipping, crash-safe saves, TensorBoard scalars,
and config errors before any process group."""

import json
import math
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.multirank import run_ranks
from tests.training.checkpoints import assert_same_state, plain_state
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


def _train_in_process(rank, world, overrides):
    from megatron_xomni.recipes import load_recipe
    from megatron_xomni.training.trainer import train

    return train(load_recipe("tiny_pt", overrides))


def _records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _state_unchanged(root, before: int, after: int) -> None:
    """Weights, Adam moments and the scheduler's step are those of `before` at `after`."""
    a, b = plain_state(root / f"iter_{before:07d}"), plain_state(root / f"iter_{after:07d}")
    assert any(k.startswith("optimizer.state.exp_avg.") for k in a)
    assert_same_state(a, b)
    sched = [json.loads((root / f"iter_{i:07d}" / "trainer_state.json").read_text())["scheduler"]["num_steps"]
             for i in (before, after)]
    assert sched[0] == sched[1]


def _write_with_spare_slot_label(prefix, good_prefix):
    """The synthetic documents, with one code of every 50th document in the image table's spare slots
    (id >= text + image_vocab_size): the image head masks those to -inf, so the loss is +inf. (The
    data is seeded, so which steps meet one is fixed; some do and some do not.)"""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_xomni.data.token_files import TokenFileWriter

    tokens, masks = IndexedDataset(str(good_prefix)), IndexedDataset(str(good_prefix) + "_lossmask")
    writer = TokenFileWriter(prefix)
    for i in range(len(tokens)):
        ids, mask = tokens[i].copy(), masks[i]
        if i % 50 == 7:
            ids[-3] = 512 + 256 + 5  # text 512 + image codes 256: a spare slot of the 320-row table
        writer.add_document(ids, mask)
    writer.finalize()


def test_nonfinite_steps_are_skipped_without_touching_the_state_and_logged_honestly(data):
    """A NaN gradient on one rank only, a real +inf loss from a spare-slot label, the consecutive-NaN
    abort, and the logging window: the mean over finite steps with the skip count, NaN when all skipped."""
    ov = lambda save, *extra: _ov(data, save, "save_interval=1", "keep_last=none", "steps=6", *extra)  # noqa: E731
    run_ranks(_train_in_process, 2, ov("nan1", "debug_inject_nonfinite_steps=[3]", "debug_inject_nonfinite_rank=1"))
    recs = _records(data / "nan1" / "metrics.jsonl")
    by_it = {r["iteration"]: r for r in recs}
    assert [by_it[i]["train_skipped_steps"] for i in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(by_it[3]["train_loss"]) and by_it[3]["train_window_skipped"] == 1  # every step of it skipped
    assert all(math.isfinite(by_it[i]["train_loss"]) for i in (1, 2, 4, 5, 6))
    _state_unchanged(data / "nan1", 2, 3)

    run_ranks(_train_in_process, 2, _ov(data, "nan2", "steps=6", "log_interval=2", "debug_inject_nonfinite_steps=[3]"))
    two = {r["iteration"]: r for r in _records(data / "nan2" / "metrics.jsonl")}
    assert two[4]["train_window_skipped"] == 1 and two[4]["train_loss"] == by_it[4]["train_loss"]  # step 3 left out
    lo, hi = sorted((by_it[1]["train_loss"], by_it[2]["train_loss"]))
    assert lo <= two[2]["train_loss"] <= hi and two[2]["train_window_skipped"] == 0

    spare = data / "data" / "spare"
    _write_with_spare_slot_label(spare, data / "data" / "syn")
    run_ranks(_train_in_process, 2, [*ov("inf"), f'data.blend=["{spare}"]', "max_consecutive_nonfinite=100"])
    recs = _records(data / "inf" / "metrics.jsonl")
    skipped_at = [r["iteration"] for r, prev in zip(recs, [{"train_skipped_steps": 0}] + recs)
                  if r["train_skipped_steps"] > prev["train_skipped_steps"]]
    assert skipped_at and len(skipped_at) < len(recs), f"spare-slot labels met at steps {skipped_at}: change the data"
    for it in skipped_at:
        assert math.isnan(by_it_or(recs, it)["train_loss"])  # an inf loss is not averaged into the log
    it = next(i for i in skipped_at if i > 1 and i - 1 not in skipped_at)
    _state_unchanged(data / "inf", it - 1, it)

    with pytest.raises(RuntimeError, match=r"2 consecutive steps had a NaN/Inf loss or gradient \(iteration 3\)"):
        run_ranks(_train_in_process, 2, _ov(data, "abort", "steps=6", "max_consecutive_nonfinite=2",
                                            "debug_inject_nonfinite_steps=[2,3]"))
    assert (data / "abort" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(data / "nan1" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/text_loss", "train/image_loss", "train/lr", "train/grad_norm",
                "throughput/tokens_per_s", "throughput/tokens_per_s_per_gpu", "throughput/tflops_per_gpu",
                "throughput/mfu", "system/memory_gib", "train/consumed_samples", "train/skipped_steps",
                "train/window_skipped"]:
        assert tag in tags, tag
    assert [e.value for e in acc.Scalars("train/skipped_steps")][-1] == 1


def by_it_or(recs, it):
    return next(r for r in recs if r["iteration"] == it)


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
