"""The converter never deletes or repoints what it did not create, and a kill during a replacement
never loses the old output (issue 14, items 4-6).

Every case runs the real command in a subprocess (`python -m megatron_xomni.cli convert` or the
tools/convert_checkpoint.py shim, with sys.executable) and checks its exit code, its one-line error and
what is left on disk. Kills are deterministic: XOMNI_CONVERT_CRASH_AT makes the converter SIGKILL
itself at a named point of the replacement.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_xomni.conversion.outputs import CRASH_ENV, LATEST, MARKER
from tests.conversion.hf_models import hf_tensors, write_qwen
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_xomni.cli", "convert"]
TOOL = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
SMALL = ["--vision-layers", "1", "1", "--image-vocab-size", "64", "--image-table-size", "96"]


def run(cmd, *args, crash=None):
    """Run a command to completion; output goes to files, not pipes, and the command's process group is
    killed afterwards: a helper process orphaned by a SIGKILL (megatron-core's async-save queue manager,
    issue 14 item 9) can neither hold the test up nor outlive it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*cmd, *map(str, args)], stdout=out, stderr=err, text=True, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, rc, out.read(), err.read())


def snapshot(root: Path) -> dict:
    """Every file under root (and root itself if it is a file) -> sha256: proves nothing was touched."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _convert(rank, world, hf, out):
    from megatron_xomni.conversion.convert import convert_hf_to_megatron

    convert_hf_to_megatron(hf, out, vision_layers=(1, 1), image_vocab_size=64, image_table_size=96)


def _export(rank, world, ckpt, out):
    from megatron_xomni.conversion.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out, "qwen2")


def _state(rank, world, root):
    from megatron_xomni.conversion.convert import load_megatron

    return load_megatron(root)[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two different sources (A, B), their Megatron roots and their HF exports; tests copy what they modify."""
    root = tmp_path_factory.mktemp("made")
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        write_qwen(root / f"hf{name}", seed=seed, hidden=32, intermediate=64)
        run_ranks(_convert, 1, str(root / f"hf{name}"), str(root / f"mg{name}"))
        run_ranks(_export, 1, str(root / f"mg{name}"), str(root / f"ex{name}"))
        (out[f"mg{name}"],) = run_ranks(_state, 1, str(root / f"mg{name}"))
        out[f"ex{name}"] = hf_tensors(root / f"ex{name}")
    out["root"] = root
    return out


def _copy(made, name, dst):
    shutil.copytree(made["root"] / name, dst)
    return dst


def _one_line_error(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]


def _same(state, ref):
    return set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


# ---- the --out rules ----------------------------------------------------------------------------
def _case(made, tmp, case):
    """(command args, the folder that must stay untouched, expected message part)."""
    hf, mg, ex = made["root"] / "hfA", made["root"] / "mgA", made["root"] / "exA"
    if case == "foreign-folder-mg":
        (tmp / "user").mkdir()
        (tmp / "user" / "notes.txt").write_text("mine")
        return ["hf-to-megatron", "--hf", hf, "--out", tmp / "user", "--overwrite"], tmp / "user", "not written by the converter"
    if case == "foreign-folder-hf":
        (tmp / "user").mkdir()
        (tmp / "user" / "notes.txt").write_text("mine")
        return ["megatron-to-hf", "--ckpt", mg, "--out", tmp / "user", "--overwrite"], tmp / "user", "not written by the converter"
    if case == "out-is-file":
        (tmp / "f").write_text("x")
        return ["megatron-to-hf", "--ckpt", mg, "--out", tmp / "f"], tmp / "f", "is a file"
    if case == "training-run":  # a trainer's root: latest + iterations, no marker
        run_dir = tmp / "run"
        shutil.copytree(mg / "iter_0000000", run_dir / "iter_0000040")
        (run_dir / "iter_0000040" / "conversion.json").unlink()
        (run_dir / LATEST).write_text("40")
        return ["hf-to-megatron", "--hf", hf, "--out", run_dir, "--overwrite"], run_dir, "holds a training run"
    if case == "training-on-top":  # a run saved into a converted root: its iterations are not ours
        root = _copy(made, "mgA", tmp / "mg")
        shutil.copytree(root / "iter_0000000", root / "iter_0000040")
        (root / "iter_0000040" / "conversion.json").unlink()
        (root / LATEST).write_text("40")
        return ["hf-to-megatron", "--hf", hf, "--out", root, "--overwrite"], root, "did not write (iter_0000040"
    if case == "earlier-mg-no-overwrite":
        root = _copy(made, "mgA", tmp / "mg")
        return ["hf-to-megatron", "--hf", made["root"] / "hfB", "--out", root], root, "pass --overwrite"
    if case == "earlier-hf-no-overwrite":
        out = _copy(made, "exA", tmp / "ex")
        return ["megatron-to-hf", "--ckpt", made["root"] / "mgB", "--out", out, "--layout", "qwen2"], out, "pass --overwrite"
    if case == "other-kind":
        out = _copy(made, "exA", tmp / "ex")
        return ["hf-to-megatron", "--hf", hf, "--out", out, "--overwrite"], out, "holds an HF export"
    if case == "user-file-in-export":
        out = _copy(made, "exA", tmp / "ex")
        (out / "README.md").write_text("my notes")
        return ["megatron-to-hf", "--ckpt", mg, "--out", out, "--overwrite", "--layout", "qwen2"], out, "README.md"
    src_case, cmd = case.rsplit("-", 1)
    src = _copy(made, "hfA" if cmd == "mg" else "mgA", tmp / "src" / "model")
    out = {"source-equal": src, "source-above": src.parent, "source-inside": src / "export"}[src_case]
    args = (["hf-to-megatron", "--hf", src] if cmd == "mg" else ["megatron-to-hf", "--ckpt", src, "--layout", "qwen2"])
    return [*args, "--out", out, "--overwrite"], src.parent, "inside" if src_case == "source-inside" else "above"


CASES = ["foreign-folder-mg", "foreign-folder-hf", "out-is-file", "training-run", "training-on-top",
         "earlier-mg-no-overwrite", "earlier-hf-no-overwrite", "other-kind", "user-file-in-export",
         "source-equal-mg", "source-above-mg", "source-inside-mg", "source-equal-hf", "source-above-hf",
         "source-inside-hf"]


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line_and_nothing_touched(made, tmp_path, case):
    args, guarded, needle = _case(made, tmp_path, case)
    before = snapshot(guarded)
    res = run(TOOL if CASES.index(case) % 2 else CLI, *args)
    _one_line_error(res, needle)
    assert snapshot(guarded) == before
    assert not list(tmp_path.rglob(f"*{'.tmp-xomni-'}*"))


# ---- kills during a replacement -----------------------------------------------------------------
def test_megatron_root_survives_a_kill_at_every_point(made, tmp_path):
    """Each run starts from what the previous kill left: it must cope (one line when it repairs),
    and after every kill the loader finds the old or the new conversion complete. The last, clean run
    is the plain --overwrite replacement: one iteration left, holding the new conversion."""
    from megatron_xomni import checkpointing

    assert LATEST == checkpointing.LATEST  # outputs.py keeps its own copy to stay torch-free
    root = _copy(made, "mgA", tmp_path / "mg")
    steps = [  # (source, crash point, the conversion `latest` must hold after the kill)
        ("B", "mg-after-write", "A"),     # dist-ckpt written, iteration not renamed
        ("B", "mg-before-latest", "A"),   # iteration renamed, latest still old
        ("B", "mg-after-latest", "B"),    # latest switched, old iteration not yet deleted
        ("A", "mg-during-delete", "A"),   # old iteration half deleted
        ("B", None, "B"),                 # a clean run finishes the job
    ]
    for i, (src, point, expect) in enumerate(steps):
        res = run(CLI if i % 2 else TOOL, "hf-to-megatron", "--hf", made["root"] / f"hf{src}", "--out", root,
                  "--overwrite", *SMALL, crash=point)
        if point:
            assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-3000:])
        else:
            assert res.returncode == 0, res.stderr[-3000:]
        if i > 0:  # every kill above left something behind to repair
            assert "finished an interrupted conversion" in res.stderr, (point, res.stderr[-3000:])
        (state,) = run_ranks(_state, 1, str(root))
        assert _same(state, made[f"mg{expect}"]), f"after a kill at {point}: latest does not hold conversion {expect}"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", LATEST, MARKER]


def test_hf_export_survives_a_kill_at_every_point(made, tmp_path):
    from megatron_xomni.conversion.hf_io import HFCheckpointReader

    out = _copy(made, "exA", tmp_path / "ex")
    steps = [  # (checkpoint, crash point, what --out must hold after the kill (once restored), leftovers to remove)
        ("B", "hf-during-write", "A", False),     # a partial new export beside the old one
        ("B", "hf-before-swap", "A", True),       # a complete new export beside the old one
        ("B", "hf-between-renames", "B", True),   # --out missing: old and new both beside it
        ("A", "hf-after-swap", "A", False),       # new in place, old not yet deleted (the loader cleaned up)
        ("B", None, "B", True),
    ]
    for i, (ckpt, point, expect, leftovers) in enumerate(steps):
        res = run(TOOL if i % 2 else CLI, "megatron-to-hf", "--ckpt", made["root"] / f"mg{ckpt}", "--out", out,
                  "--overwrite", "--layout", "qwen2", crash=point)
        if point:
            assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-3000:])
        else:
            assert res.returncode == 0, res.stderr[-3000:]
        if point == "hf-between-renames":
            assert not out.exists()
            half_done = tmp_path / "half_done"
            shutil.copytree(tmp_path, half_done / "copy", ignore=shutil.ignore_patterns("half_done"))
            # the loader restores it ...
            HFCheckpointReader(out)
            # ... and so does the next run (here one that is then refused: nothing else happens)
            again = run(CLI, "megatron-to-hf", "--ckpt", made["root"] / "mgA", "--out", half_done / "copy" / "ex")
            assert "restored" in again.stderr and "pass --overwrite" in again.stderr, again.stderr
            assert _same(hf_tensors(half_done / "copy" / "ex"), made[f"ex{expect}"])
            shutil.rmtree(half_done)
        assert ("removed leftovers of an interrupted export" in res.stderr) == leftovers, (point, res.stderr[-3000:])
        assert _same(hf_tensors(out), made[f"ex{expect}"]), f"after a kill at {point}: --out does not hold {expect}"
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(out).vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


def test_a_killed_first_conversion_is_started_again_without_overwrite(made, tmp_path):
    root = tmp_path / "mg"
    res = run(CLI, "hf-to-megatron", "--hf", made["root"] / "hfA", "--out", root, *SMALL, crash="mg-before-latest")
    assert res.returncode == -signal.SIGKILL and not (root / LATEST).exists()  # iteration 0 complete, never pointed to
    res = run(TOOL, "hf-to-megatron", "--hf", made["root"] / "hfA", "--out", root, *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "removed iter_0000000" in res.stderr and "did not finish; starting it again" in res.stderr
    (state,) = run_ranks(_state, 1, str(root))
    assert _same(state, made["mgA"])
