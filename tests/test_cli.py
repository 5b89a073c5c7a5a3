"""The `xomni` command: generate / chat end to end at TP=1 and TP=2 (same seed -> same PNG bytes), evaluate's
output layouts, and one-line errors (exit 2) that come before any model is built."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.inference.fixtures import bundle, no_loading  # noqa: F401  (fixtures)
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(300)
QUESTION = ["What color is the shape?", "How many shapes are there?"]


def _cli(rank, world, commands):
    """Run several `xomni` commands in one process; returns [(exit code, stdout)] per command."""
    from megatron_xomni import cli

    results = []
    for argv in commands:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(argv)
        results.append((rc, buf.getvalue()))
    return results


def _gen_args(bundle, out, tp=1):
    # 2 prompts x 3 images in batches of 4: a batch spans both prompts and the last one is partial.
    return ["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--prompt", "two blue squares",
            "--num-images", "3", "--size", "64x48", "--seed", "11", "--batch-size", "4", "--decoder-steps", "2",
            "--tensor-parallel", str(tp), "--out", str(out)]


def _chat_args(bundle, tp=1):
    args = ["chat", "--bundle", str(bundle), "--image", str(bundle / "question.png"), "--max-new-tokens", "6",
            "--tensor-parallel", str(tp), "--json"]
    for q in QUESTION:
        args += ["--question", q]
    return args


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_generate_and_chat_tp1_tp2(bundle, tmp_path):
    tp1 = run_ranks(_cli, 1, [_gen_args(bundle, tmp_path / "a"), _gen_args(bundle, tmp_path / "b"),
                              _chat_args(bundle)])[0]
    # one command per 2-rank launch: a gloo world of 2 cannot re-rendezvous on the same port in one process
    tp2 = [g + c for g, c in zip(run_ranks(_cli, 2, [_gen_args(bundle, tmp_path / "tp2", tp=2)]),
                                 run_ranks(_cli, 2, [_chat_args(bundle, tp=2)]))]
    assert [rc for rc, _ in tp1] == [0, 0, 0]
    assert all(rc == 0 for r in tp2 for rc, _ in r)

    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "tp2")
    assert sorted(a) == [f"{k:05d}.png" for k in range(6)]
    assert a == b  # same seed, TP=1 twice: the same PNG bytes
    assert a == c  # TP=2 samples the same codes, so rank 0 decodes the same images
    assert len(set(a.values())) == 6  # every image has its own seed
    with Image.open(tmp_path / "a" / "00000.png") as im:
        assert im.size == (48, 64)

    rows = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == sorted(a)
    assert [r["prompt"] for r in rows] == ["a red circle"] * 3 + ["two blue squares"] * 3
    assert [r["seed"] for r in rows] == list(range(11, 17))
    assert rows[0]["min_p"] == 0.03 and rows[0]["temperature"] == 1.0 and rows[0]["cfg_scale"] == 1.0
    assert rows[0]["height"] == 64 and rows[0]["width"] == 48 and rows[0]["decoder_steps"] == 2
    assert (tmp_path / "tp2" / "generations.jsonl").read_text() == (tmp_path / "a" / "generations.jsonl").read_text()

    # chat: rank 0 prints the answers; TP=2 gives the TP=1 (greedy) answers
    answers = json.loads(tp1[2][1])
    assert len(answers) == 2 and all(isinstance(x, str) for x in answers)
    assert json.loads(tp2[0][1][1]) == answers
    assert tp2[1][1][1] == ""  # only rank 0 prints


def test_single_image_reproduces_from_its_seed(bundle, tmp_path):
    # Image 4 of a 6-image run (prompt 2, seed 15) regenerated on its own, in a batch of one.
    one = ["generate", "--bundle", str(bundle), "--prompt", "two blue squares", "--seed", "15", "--size", "64x48",
           "--decoder-steps", "2", "--batch-size", "1", "--out", str(tmp_path / "one"), "--no-progress"]
    full = _gen_args(bundle, tmp_path / "full")
    full[full.index("--batch-size") + 1] = "1"
    (r1, r2), = run_ranks(_cli, 1, [one, full])
    assert r1[0] == 0 and r2[0] == 0
    assert (tmp_path / "one" / "00000.png").read_bytes() == (tmp_path / "full" / "00004.png").read_bytes()


def test_evaluate_layouts(bundle, tmp_path):
    gen = tmp_path / "geneval.jsonl"
    gen.write_text("\n".join(json.dumps(o) for o in [
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"},
    ]) + "\n")
    dpg = tmp_path / "dpg" / "prompts"
    dpg.mkdir(parents=True)
    (dpg / "item_a.txt").write_text("a cat on a mat")
    lt = tmp_path / "text_prompts.jsonl"
    lt.write_text(json.dumps({"prompt_id": "0007", "prompt": "a sign saying OPEN", "text": "OPEN"}) + "\n")
    common = ["--bundle", str(bundle), "--size", "64x64", "--decoder-steps", "1", "--no-progress"]
    runs = [
        ["evaluate", "--benchmark", "world", "--per-skill", "1", "--images-per-prompt", "1",
         "--out", str(tmp_path / "world"), *common],
        ["evaluate", "--benchmark", "geneval", "--prompts", str(gen), "--images-per-prompt", "2",
         "--out", str(tmp_path / "ge"), *common],
        ["evaluate", "--benchmark", "dpg", "--prompts", str(tmp_path / "dpg"), "--out", str(tmp_path / "dp"), *common],
        ["evaluate", "--benchmark", "longtext", "--prompts", str(lt), "--images-per-prompt", "2",
         "--out", str(tmp_path / "lt"), *common],
    ]
    (results,) = run_ranks(_cli, 1, runs)
    assert [rc for rc, _ in results] == [0, 0, 0, 0]

    # world: report recomputed here from the saved images with the benchmark's own scorer
    from megatron_xomni.evaluation.world_bench import score_world_benchmark, world_benchmark_prompts

    report = json.loads((tmp_path / "world" / "world.json").read_text())
    prompts = world_benchmark_prompts(n_per_skill=1, height=64, width=64)
    images = [[Image.open(tmp_path / "world" / "images" / f"{i:04d}_0.png").convert("RGB")] for i in range(len(prompts))]
    assert report["num_prompts"] == len(prompts)
    assert report["per_skill"] == score_world_benchmark(prompts, images)["per_skill"]
    assert "| **overall** |" in (tmp_path / "world" / "world.md").read_text()
    assert json.loads(results[0][1])["overall"] == report["overall"]

    # geneval: <index>/metadata.jsonl (the prompt's metadata line) + samples/*.png
    meta = json.loads((tmp_path / "ge" / "00001" / "metadata.jsonl").read_text())
    assert meta == {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}
    assert sorted(p.name for p in (tmp_path / "ge" / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]

    # dpg: one 2x2 grid of the 4 default images per item
    with Image.open(tmp_path / "dp" / "item_a.png") as im:
        assert im.size == (128, 128)

    # longtext: {prompt_id}_{j}.png + a score in [0, 1]
    assert sorted(p.name for p in (tmp_path / "lt" / "images").iterdir()) == ["0007_0.png", "0007_1.png"]
    lt_report = json.loads((tmp_path / "lt" / "longtext.json").read_text())
    assert 0.0 <= lt_report["accuracy"] <= 1.0 and len(lt_report["results"]) == 2


# ------------------------------------------------------------------------------------------ errors
def _run_error(argv, capsys) -> str:
    from megatron_xomni import cli

    t0 = time.perf_counter()
    rc = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert elapsed < 5.0
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _copy_with_json(src: Path, dst: Path, name: str, **changes) -> Path:
    """A copy of folder `src` whose `name` JSON has `changes`."""
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((src / name).read_text())
    data.update(changes)
    (dst / name).write_text(json.dumps(data))
    return dst


def test_errors_are_one_line_and_load_nothing(bundle, tmp_path, capsys, no_loading):
    import shutil

    import megatron_xomni.models.xomni  # noqa: F401  (import time is not what the speed bound measures)

    gen = ["generate", "--prompt", "a red circle", "--size", "64x64", "--out", str(tmp_path / "o")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert "bad.jsonl:2:" in _run_error(["generate", "--bundle", str(bundle), "--prompts-file", str(bad),
                                         "--out", str(tmp_path / "o")], capsys)
    assert "not a multiple of the 16-pixel token grid" in _run_error(
        ["generate", "--bundle", str(bundle), "--prompt", "a", "--size", "60x64", "--out", str(tmp_path / "o")], capsys)
    assert "does not exist" in _run_error([*gen, "--bundle", str(bundle), "--model", str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in" in _run_error([*gen, "--bundle", str(bundle), "--model", str(tmp_path / "empty")], capsys)

    # text tokenizer larger than the model's text table
    model = tmp_path / "model"
    shutil.copytree(bundle / "model", model)
    cfg = next(model.glob("iter_*")) / "model_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "text_vocab_size": 64}))
    assert "text_vocab_size=64 is smaller than the text tokenizer" in _run_error(
        [*gen, "--bundle", str(bundle), "--model", str(model)], capsys)

    # image tokenizer codebook != model image vocabulary
    itok = _copy_with_json(bundle / "image_tokenizer", tmp_path / "itok", "config.json", codebook_size=128)
    assert "image_vocab_size=256 != image tokenizer codebook size 128" in _run_error(
        [*gen, "--bundle", str(bundle), "--image-tokenizer", str(itok)], capsys)

    # decoder trained on other features
    dec = _copy_with_json(bundle / "decoder", tmp_path / "dec", "decoder_config.json", adapter_dim=32)
    assert "decoder adapter_dim=32 != image tokenizer adapter_dim=64" in _run_error(
        [*gen, "--bundle", str(bundle), "--decoder", str(dec)], capsys)

    assert "image" in _run_error(["chat", "--bundle", str(bundle), "--image", str(tmp_path / "no.png"),
                                  "--question", "q"], capsys)
    assert "torchrun --nproc-per-node 2" in _run_error([*gen, "--bundle", str(bundle), "--tensor-parallel", "2"], capsys)
    assert no_loading == []


def test_error_exit_code_from_the_command_line(bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_xomni.cli", "generate", "--bundle", str(bundle),
                           "--prompt", "a", "--size", "60x64", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: image size 60x64 is not a multiple of the 16-pixel token grid: use e.g. 64x64"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["generate", "chat", "evaluate"])
def test_subcommand_help(command, capsys):
    from megatron_xomni import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--bundle" in text and "--tensor-parallel" in text


def test_delegation(monkeypatch, capsys):
    import types

    from megatron_xomni import cli

    seen = {}
    fake = types.ModuleType("megatron_xomni.demo.cli")
    fake.main = lambda argv: seen.setdefault("demo", argv) and 0
    monkeypatch.setitem(sys.modules, "megatron_xomni.demo.cli", fake)
    assert cli.main(["demo", "--out", "x", "--smoke"]) == 0
    assert seen["demo"] == ["--out", "x", "--smoke"]

    import megatron_xomni.train as train

    monkeypatch.setattr(train, "main", lambda argv: seen.setdefault("train", argv) and 0)
    assert cli.main(["train", "tiny_pt", "train.iters=1"]) == 0
    assert seen["train"] == ["tiny_pt", "train.iters=1"]
    seen.clear()
    assert cli.main(["tokenize", "xomni_tokenize", "corpus=c"]) == 0  # the tokenization stage's recipes only
    assert seen["train"] == ["xomni_tokenize", "corpus=c"]
    capsys.readouterr()
    assert cli.main(["tokenize", "tiny_pt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tiny_pt' is not a tokenization recipe: choose one of tiny_tokenize, xomni_tokenize" in err[0]

    with pytest.raises(SystemExit) as exc:  # the real converter's argparse
        cli.main(["convert", "--help"])
    assert exc.value.code == 0
    assert "hf-to-megatron" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ outputs
def _fake_previous_run(out: Path) -> dict[str, bytes]:
    """A folder as an earlier `generate` left it (3 images + generations.jsonl) plus a file of the user's."""
    out.mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(out / f"{k:05d}.png")
    (out / "generations.jsonl").write_text("".join(json.dumps({"index": k, "file": f"{k:05d}.png"}) + "\n"
                                                   for k in range(3)))
    (out / "notes.txt").write_text("mine")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_generate_refuses_a_non_empty_out(bundle, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    before = _fake_previous_run(out)
    gen = ["generate", "--bundle", str(bundle), "--prompt", "a", "--size", "64x64", "--out", str(out)]
    assert "is not empty: pick a new folder, or pass --overwrite" in _run_error(gen, capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in _run_error([*gen[:-1], str(tmp_path / "f")], capsys)
    # --overwrite deletes only what the old log lists, and never a path outside the folder
    (out / "generations.jsonl").write_text(json.dumps({"file": "../escape.png"}) + "\n")
    assert "names '../escape.png', not an image file of this folder" in _run_error([*gen, "--overwrite"], capsys)
    assert no_loading == []


def test_generate_overwrite_replaces_the_images_it_wrote(bundle, tmp_path):
    out = tmp_path / "out"
    before = _fake_previous_run(out)
    (rc, _), = run_ranks(_cli, 1, [["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--size", "64x48",
                                    "--decoder-steps", "1", "--out", str(out), "--overwrite", "--no-progress"]])[0]
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "generations.jsonl", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"  # not listed: not ours to delete
    assert (out / "00000.png").read_bytes() != before["00000.png"]
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000.png"] and rows[0]["prompt"] == "a red circle"


@pytest.mark.parametrize("bench,files,words", [
    ("dpg", {"dpg_bench.csv": "item_id,text\n../../evil,a cat\n"}, "item_id '../../evil' is not a plain file name"),
    ("dpg", {"prompts/.hidden.txt": "a cat"}, "item_id '.hidden' is not a plain file name"),
    ("longtext", {"text_prompts.jsonl": json.dumps({"prompt_id": "/tmp/x", "prompt": "p", "text": "t"}) + "\n"},
     "prompt_id '/tmp/x' is not a plain file name"),
    ("longtext", {"text_prompts.jsonl": json.dumps({"prompt_id": "..", "prompt": "p", "text": "t"}) + "\n"},
     "prompt_id '..' is not a plain file name"),
    ("longtext", {"text_prompts.jsonl": "".join(json.dumps({"prompt_id": "7", "prompt": p, "text": "t"}) + "\n"
                                                for p in ("a", "b"))}, "two prompts have prompt_id '7'"),
])
def test_benchmark_ids_cannot_name_paths_outside_out(bundle, tmp_path, capsys, no_loading, bench, files, words):
    src = tmp_path / "bench"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    prompts = src if bench == "dpg" else src / "text_prompts.jsonl"
    err = _run_error(["evaluate", "--benchmark", bench, "--prompts", str(prompts), "--bundle", str(bundle),
                      "--size", "64x64", "--out", str(tmp_path / "o" / "out")], capsys)
    assert words in err and str(prompts) in err
    assert not (tmp_path / "o").exists() and no_loading == []


def test_write_outputs_refuses_unsafe_ids_itself(tmp_path):
    """Defence in depth: the writer re-checks ids, whoever built the job."""
    from megatron_xomni.evaluation.benchmarks import BenchmarkPrompt
    from megatron_xomni.inference.evaluate import EvalJob, write_outputs

    job = EvalJob("dpg", [BenchmarkPrompt(id="../escape", prompt="p")], 1, 16, 16)
    with pytest.raises(ValueError, match="not a plain file name"):
        write_outputs(job, [[Image.new("RGB", (16, 16))]], tmp_path / "out")
    assert not (tmp_path / "escape.png").exists()
