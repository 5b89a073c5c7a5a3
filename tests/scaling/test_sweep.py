"""`xomni scaling plan -> launch -> collect -> fit` on a micro sweep (3 sizes x 3 budgets, a few
steps each, synthetic token data), and the plans that are refused.

Expected values are written here from the documented rules (DeepSeek's batch rule, the width-based
learning rate, steps = C / (batch x length x FLOPs per token)) and from the runs' own files
(metrics.jsonl, checkpoints), not taken from the code under test.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from megatron_xomni.checkpointing import latest_iteration
from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens
from megatron_xomni.models.xomni.flops import model_flops_per_token, param_counts
from megatron_xomni.scaling.cli import main as scaling_main
from megatron_xomni.scaling.family import ModelFamily
from megatron_xomni.training import faults

FAMILY = ["aspect_ratio=32", "head_dim=16"]
DEPTHS, BUDGETS = (1, 2, 3), (2.5e9, 5e9, 1e10)
SEQ, MICRO = 64, 8  # the tiny_pt recipe's
IMAGE_GRID = 16  # synthetic documents: caption (unsupervised), 16 image codes and EOD (supervised)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = scaling_main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep_data")
    write_synthetic_tokens(root / "syn", 300, 512, 256, seed=0, image_grid=IMAGE_GRID)
    return root


def _plan_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["plan", "tiny_pt", f'data.blend=["{data}/syn"]', f"data.cache_dir={data}/cache",
            "--out", str(out), "--depths", ",".join(map(str, DEPTHS)),
            "--budgets", ",".join(map(str, BUDGETS)), *[f"--family={f}" for f in FAMILY],
            "--evals", "2", "--eval-iters", "1", *extra]


def test_plan_follows_the_family_rules(data, tmp_path):
    rc, out, err = cli(*_plan_args(data, tmp_path / "sw"))
    assert rc == 0, err
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["design"] == "isoflop" and len(sweep["runs"]) == 9
    # every supervised target of a synthetic document is an image code, but the EOD
    assert sweep["image_fraction"] == pytest.approx(IMAGE_GRID / (IMAGE_GRID + 1), abs=1e-12)
    family = ModelFamily(aspect_ratio=32, head_dim=16)
    for run in sweep["runs"]:
        d, c = run["depth"], run["budget"]
        ov = dict(o.split("=", 1) for o in run["overrides"])
        m = family.member(d)
        # head size 16, aspect ratio 32: 2d query heads sharing one KV head (d <= 3), hidden 32d
        assert (int(ov["model.num_layers"]), int(ov["model.hidden_size"]), int(ov["model.num_attention_heads"]),
                int(ov["model.num_query_groups"])) == (d, 32 * d, 2 * d, 1)
        # DeepSeek LLM's batch rule, 0.292 C^0.3271 tokens, in whole micro-batches
        gbs = max(1, round(0.292 * c**0.3271 / SEQ / MICRO)) * MICRO
        assert int(ov["data.global_batch_size"]) == gbs == run["global_batch_size"]
        exact = c / (gbs * SEQ * model_flops_per_token(m, SEQ, IMAGE_GRID / (IMAGE_GRID + 1)))
        steps = int(ov["steps"])
        assert abs(steps - exact) <= max(0.5, 0.02 * exact)  # nearest step, or within 2 % of it
        assert steps % int(ov["eval_interval"]) == 0  # the final step is evaluated
        assert float(ov["optim.lr"]) == pytest.approx(6e-4 * math.sqrt(768 / m.hidden_size), rel=1e-5)
        assert float(ov["optim.min_lr"]) == pytest.approx(0.1 * float(ov["optim.lr"]), rel=1e-5)  # tiny_pt's ratio
        assert run["tokens"] == steps * gbs * SEQ
        assert run["params"] == param_counts(m).non_embedding
        assert ov["save_dir"] == str(tmp_path / "sw" / "runs" / run["name"])
    # an existing sweep is not replaced by accident
    rc, _, err = cli(*_plan_args(data, tmp_path / "sw"))
    assert rc == 2 and "exists" in err and "--force" in err


def test_image_fraction_of_a_weighted_blend(data, tmp_path):
    # a blend weight is a share of positions: file i contributes weight x (targets per position)
    write_synthetic_tokens(tmp_path / "short", 200, 512, 256, seed=1, image_grid=4)
    parts = []
    for prefix, w in ((data / "syn", 0.7), (tmp_path / "short", 0.3)):
        ids = np.fromfile(f"{prefix}.bin", dtype=np.int32)
        mask = np.fromfile(f"{prefix}_lossmask.bin", dtype=np.uint8).astype(bool)
        parts.append((w * mask.mean(), (ids[mask] >= 512).mean()))
    expected = sum(t * f for t, f in parts) / sum(t for t, _ in parts)
    blend = json.dumps([0.7, str(data / "syn"), 0.3, str(tmp_path / "short")])
    rc, _, err = cli("plan", "tiny_pt", f"data.blend={blend}", "--out", str(tmp_path / "sw"), "--depths", "1,2,3",
                     "--budgets", "1e10,2e10", *[f"--family={f}" for f in FAMILY])
    assert rc == 0, err
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["image_fraction"] == pytest.approx(expected, rel=1e-9)
    assert sweep["image_fraction_source"] == "measured from data.blend"


@pytest.mark.parametrize("extra, needle", [
    (["--depths", "1,2"], "needs >= 3 sizes per budget"),
    (["--budgets", "1e10"], "needs >= 2"),
    (["--budgets", "1e3,1e10"], "budget 1e+03 FLOPs is smaller than one step of depth 1"),
    (["parallel.tensor_parallel=2", "--ranks", "2"],
     "family member depth=1 (32 hidden, 2 heads, 1 KV heads, 3 layers) does not fit TP=2"),
    (["steps=5"], "override steps is set by the plan"),
    (["--depths", "1,1,2"], "repeats a value"),
    (["--family=lr_reff=1"], "--family: unknown config key"),
])
def test_bad_plans_are_refused_in_one_line(data, tmp_path, extra, needle):
    args = _plan_args(data, tmp_path / "bad")
    for flag in ("--depths", "--budgets"):  # a later flag replaces the default one
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    rc, out, err = cli(*args, *extra)
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "bad" / "sweep.json").exists()


def test_tokens_design_needs_six_runs(data, tmp_path):
    rc, _, err = cli("plan", "tiny_pt", f'data.blend=["{data}/syn"]', "--out", str(tmp_path / "t"),
                     "--depths", "1,2", "--tokens", "1e4,2e4", *[f"--family={f}" for f in FAMILY])
    assert rc == 2 and "needs >= 2 sizes, >= 2 token counts and >= 6 runs" in err, err


def _moved(sw: Path, run: dict, save_dir: Path) -> Path:
    """A sweep file holding only `run`, saving into `save_dir` (beside it)."""
    sweep = json.loads((sw / "sweep.json").read_text())
    overrides = [f"save_dir={save_dir}" if o.startswith("save_dir=") else o for o in run["overrides"]]
    sweep["runs"] = [dict(run, index=0, overrides=overrides, save_dir=str(save_dir))]
    path = save_dir.parent / "reference_sweep.json"
    path.write_text(json.dumps(sweep))
    return path


def _metrics(save_dir: Path) -> tuple[list, list]:
    recs = [json.loads(l) for l in (save_dir / "metrics.jsonl").read_text().splitlines() if l]
    return [r for r in recs if "train_loss" in r], [r for r in recs if "valid_loss" in r]


def test_micro_sweep_plan_launch_collect_fit(data, tmp_path, monkeypatch):
    sw = tmp_path / "sw"
    assert cli(*_plan_args(data, sw))[0] == 0
    sweep = json.loads((sw / "sweep.json").read_text())
    first = sweep["runs"][0]
    assert first["steps"] >= 8

    # The first launch is preempted at step 5 of the first run (SIGUSR1, as SLURM sends it): the run
    # saves and stops, the launch stops, and the signal handlers are this process's own again.
    real_fire = faults.fire

    def preempt_once(point, step, spec):
        if point == "after_step" and step == 5 and not preempted:
            preempted.append(step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_fire(point, step, spec)

    preempted: list = []
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(faults, "fire", preempt_once)
    rc, out, err = cli("launch", str(sw))
    assert rc == 3 and "was interrupted and saved at iteration 5: launch again to resume it" in out, out + err
    assert latest_iteration(first["save_dir"]) == 5 and signal.getsignal(signal.SIGTERM) is handler
    rc, out, err = cli("launch", str(sw))
    assert rc == 0 and "0 of 9 runs finished, 9 to run" in out and "(resuming)" in out, out + err
    for run in sweep["runs"]:
        assert latest_iteration(run["save_dir"]) == run["steps"], run["name"]
    # resumed exactly: the same run uninterrupted ends with the same validation losses
    ref = tmp_path / "reference"
    rc, _, err = cli("launch", str(_moved(sw, first, ref)))
    assert rc == 0, err
    assert _metrics(ref)[1][-1] == _metrics(Path(first["save_dir"]))[1][-1]

    # re-launch runs nothing new: no metrics, checkpoints or attempts are added
    before = {p: p.read_bytes() for p in sw.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt")}
    rc, out, err = cli("launch", str(sw))
    assert rc == 0 and "9 of 9 runs finished, 0 to run" in out, out + err
    assert {p: p.read_bytes() for p in before} == before

    assert cli("collect", str(sw))[0] == 0
    with open(sw / "runs.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert len(rows) == 9
    for run in sweep["runs"]:
        row = rows[run["name"]]
        train, valid = _metrics(Path(run["save_dir"]))
        cfg = json.loads((Path(run["save_dir"]) / "run_config.json").read_text())
        assert row["status"] == "finished" and float(row["budget"]) == run["budget"]
        assert int(row["tokens"]) == cfg["steps"] * cfg["data"]["global_batch_size"] * cfg["data"]["seq_length"]
        assert int(row["params"]) == run["params"]  # non-embedding
        # the trainer's FLOPs: TFLOP/s x seconds over its logging windows (one rank), per position
        # logged, times D (the preempted run's first attempt stopped before its first log line)
        logged = sum(r["throughput_tflops_per_gpu"] * 1e12 * r["throughput_window_seconds"] for r in train)
        positions = sum(r["throughput_tokens_per_s"] * r["throughput_window_seconds"] for r in train)
        assert float(row["flops"]) == pytest.approx(logged / positions * int(row["tokens"]), rel=1e-6)
        if run is not first:
            assert float(row["flops"]) == pytest.approx(logged, rel=1e-6)
        assert float(row["flops"]) == pytest.approx(run["flops"], rel=0.01)  # the plan's estimate
        final = valid[-1]
        assert final["iteration"] == run["steps"]
        for key in ("text_loss", "image_loss", "loss"):
            assert float(row[key]) == pytest.approx(final[f"valid_{key}"], rel=1e-8)
            tail = [(r["iteration"], r[f"valid_{key}"]) for r in valid if r["iteration"] >= run["steps"] / 2]
            if len(tail) >= 3:
                slope, icpt = np.polyfit(*np.array(tail).T, 1)
                expected = icpt + slope * run["steps"]
            else:
                expected = final[f"valid_{key}"]
            assert float(row[f"{key}_smoothed"]) == pytest.approx(expected, rel=1e-6)
        assert float(row["train_seconds"]) == pytest.approx(sum(r["throughput_window_seconds"] for r in train), rel=1e-6)
        assert int(row["attempts"]) == (2 if run is first else 1)
        assert float(row["wall_seconds"]) >= float(row["train_seconds"])
        assert json.loads(row["overrides"]) == run["overrides"]

    rc, out, err = cli("fit", str(sw / "runs.csv"), "--bootstrap", "40", "--bootstrap-starts", "0")
    assert rc == 0, out + err
    summary = (sw / "fit" / "summary.md").read_text()
    assert "## text_loss" in summary and "## image_loss" in summary and "non-embedding" in summary
    assert "| alpha |" in summary and "### Approach 2" in summary and "9 finished runs" in summary
    pngs = sorted(p.name for p in (sw / "fit").glob("*.png"))
    for col in ("text_loss", "image_loss"):
        assert f"{col}_vs_flops.png" in pngs and f"{col}_frontier.png" in pngs
    for p in (sw / "fit").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a new plan into the same folder (another learning-rate rule) does not count the old results
    assert cli(*_plan_args(data, sw, "--force", "--family=lr_ref=1e-3"))[0] == 0
    for command in ("launch", "collect"):
        rc, out, err = cli(command, str(sw))
        assert rc == 2 and len(err.strip().splitlines()) == 1, (out, err)
        assert "was started with another config than the sweep plans (optim.lr, optim.min_lr)" in err, err


def test_help_runs_as_a_script():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "megatron_xomni.cli", "scaling", "launch", "--help"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    for needle in ("--slurm", "--dry-run", "--nodes", "--ranks-per-node", "--max-parallel", "--torchrun"):
        assert needle in res.stdout, needle
    res = subprocess.run([sys.executable, "-m", "megatron_xomni.cli", "scaling"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert res.returncode == 2 and "plan" in res.stdout and "collect" in res.stdout
