"""The test suite itself: subprocesses run this interpreter, and no process outlives a session."""
import ast
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.multirank import run_ranks

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BARE = {"python", "python3", "torchrun", "pytest", "pip"}  # whatever PATH has, not this interpreter
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "execv", "execvp", "spawnv"}


def _bare_commands(path: Path) -> list[str]:
    """`subprocess.run(["python", ...])`-style calls (a literal argv whose program is a bare name)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.List, ast.Tuple))):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        elts = node.args[0].elts
        if name in RUNNERS and elts and isinstance(elts[0], ast.Constant) and elts[0].value in BARE:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {elts[0].value!r}")
    return found


def _test_files():
    return sorted(TESTS.rglob("*.py"))


@pytest.mark.parametrize("path", _test_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_subprocesses_use_sys_executable(path):
    assert not _bare_commands(path), "use sys.executable (a venv's python need not be on PATH)"


def test_probe_launches_ranks():
    """Starts this session's forkserver (the probe test_no_process_outlives_the_session runs)."""
    assert run_ranks(_rank_id, 1) == [0]


def _rank_id(rank, world):
    return rank


def _marked_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_process_outlives_the_session(tmp_path):
    """A pytest session that launched ranks leaves neither its forkserver nor its resource tracker."""
    marker = f"XOMNI_HYGIENE_PROBE={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, key: value, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q",
                           f"{Path(__file__).relative_to(REPO)}::test_probe_launches_ranks"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    left = _marked_pids(marker)
    assert not left, f"processes left behind: {[Path(f'/proc/{p}/cmdline').read_bytes()[:200] for p in left]}"
