"""Where converter outputs go, and how an earlier output is replaced without ever losing one.

Every output carries `xomni_conversion.json` (what wrote it, kind, source, time, version), so the
converter only ever replaces or deletes what it wrote itself:

- an `--out` that is a file, or a non-empty folder without the marker, is refused (a training run
  there - a `latest` file and no marker - gets its own message: converting would repoint `latest`);
- an `--out` holding an earlier output of the same kind is replaced only with `--overwrite`; one of
  the other kind never;
- an `--out` equal to, above or inside the source is always refused;
- a Megatron root whose iterations were not all written by the converter (a training run saved on
  top of it) is refused: its iterations are not ours to delete.

Replacement is crash-safe; after a kill at any moment a loader finds the old or the new output
complete, and the next run finishes or undoes the interrupted replacement, saying so in one line:

- Megatron roots: the new output is the next iteration, written through the atomic save protocol of
  `megatron_xomni.checkpointing` (iter_N.tmp -> iter_N -> `latest`), so `latest` switches from the old
  to the new complete iteration in one rename. Only then is the old iteration renamed out of the
  iter_* namespace and deleted. Each converter iteration holds `conversion.json`; any other iteration
  is foreign.
- HF folders: the new export is built beside the old one in `<out>.tmp-xomni-<id>` with the marker
  written last (a tmp folder with a marker is complete), then swapped in with two renames
  (out -> `<out>.old-xomni-<id>`, tmp -> out) before the old one is deleted. A run (or
  `HFCheckpointReader`) that finds `<out>` missing renames the complete new export into place, or
  else the old one back.

`XOMNI_CONVERT_CRASH_AT=<point>` SIGKILLs the process at a named point (tests use it to prove the
above; nothing else sets it). Points: hf-during-write, hf-before-swap, hf-between-renames,
hf-after-swap; mg-after-write (dist-ckpt written, iteration not yet renamed), mg-before-latest
(iteration renamed, `latest` still old), mg-after-latest, mg-during-delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from megatron_xomni.conversion import ConversionError

MARKER = "xomni_conversion.json"
ITERATION_RECORD = "conversion"  # metadata name: iter_N/conversion.json
WRITER = "megatron_xomni.conversion"
KINDS = {"megatron": "a Megatron checkpoint root (hf-to-megatron)", "hf": "an HF export (megatron-to-hf)"}
CRASH_ENV = "XOMNI_CONVERT_CRASH_AT"
TMP_TAG, OLD_TAG = ".tmp-xomni-", ".old-xomni-"
DELETING = ".xomni-deleting-"
LATEST = "latest_checkpointed_iteration.txt"  # megatron_xomni.checkpointing.LATEST (kept torch-free here)
_ITER = re.compile(r"iter_(\d+)")


# ---- records -------------------------------------------------------------------------------
def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("megatron-xomni")
    except metadata.PackageNotFoundError:
        return "unknown"


def record(kind: str, source, **extra) -> dict:
    """The marker / conversion.json payload of one conversion."""
    return {"writer": WRITER, "kind": kind, "source": str(Path(source).resolve()),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": _version(), **extra}


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(folder: Path) -> Optional[dict]:
    """The marker of a converter output; None when there is none; ConversionError when it is not ours."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("writer") != WRITER or data.get("kind") not in KINDS:
        raise ConversionError(f"{path} is not a marker written by this converter: choose another --out")
    return data


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when XOMNI_CONVERT_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def save_crash_points():
    """Test hook: the two crash points inside the atomic save protocol (see the module docstring).

    They wrap the functions `save_checkpoint` calls, only while XOMNI_CONVERT_CRASH_AT names one of them."""
    point = os.environ.get(CRASH_ENV)
    if point not in ("mg-after-write", "mg-before-latest"):
        yield
        return
    from megatron.core import dist_checkpointing

    from megatron_xomni import checkpointing

    patched = (dist_checkpointing, "save") if point == "mg-after-write" else (checkpointing, "_atomic_write_text")
    original = getattr(*patched)

    def wrapper(*args, **kwargs):
        if point == "mg-before-latest" and Path(args[0]).name == LATEST:
            crash_point(point)
        out = original(*args, **kwargs)
        if point == "mg-after-write":
            crash_point(point)
        return out

    setattr(*patched, wrapper)
    try:
        yield
    finally:
        setattr(*patched, original)


def say(line: str) -> None:
    print(f"[xomni convert] {line}", file=sys.stderr, flush=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- path rules ----------------------------------------------------------------------------
def check_not_source(out, source, source_flag: str) -> None:
    """--out must lie outside the source, and the source outside --out."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or o in s.parents:
        raise ConversionError(f"--out {out} is the {source_flag} folder or lies above it ({s}): writing there "
                              "would replace the source; choose a folder outside it")
    if s in o.parents:
        raise ConversionError(f"--out {out} lies inside the {source_flag} folder {s}: choose a folder outside it")


def _existing(out: Path, kind: str, overwrite: bool) -> Optional[dict]:
    """The marker of an earlier output of `kind` at `out` that may be replaced; None when `out` is free.
    ConversionError for everything that must not be touched."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file: choose a folder path")
    if not out.exists() or not any(out.iterdir()):
        return None
    marker = read_marker(out)
    if marker is None:
        if kind == "megatron" and (out / LATEST).exists():
            raise ConversionError(f"--out {out} holds a training run ({LATEST}, no {MARKER}): converting into it "
                                  "would repoint its latest checkpoint; choose a new --out")
        raise ConversionError(f"--out {out} is not empty and was not written by the converter (no {MARKER}): "
                              "choose an empty or new folder")
    if marker["kind"] != kind:
        raise ConversionError(f"--out {out} holds {KINDS[marker['kind']]}, not {KINDS[kind]}: choose another --out")
    return marker


def _refuse_without_overwrite(out: Path, marker: dict) -> None:
    raise ConversionError(f"--out {out} holds an earlier conversion (from {marker.get('source')}, "
                          f"{marker.get('time')}): pass --overwrite to replace it")


# ---- Megatron roots ------------------------------------------------------------------------
@dataclass
class MegatronPlan:
    """What hf-to-megatron writes: `iteration` into `root`, then deletes `old` (the replaced iterations)."""

    root: Path
    iteration: int
    old: list = field(default_factory=list)


def _iterations(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.iterdir():
        m = _ITER.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _latest(root: Path) -> Optional[int]:
    path = root / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ConversionError(f"{path} is corrupt ({text!r}): delete the folder's contents or choose another --out")
    return int(text)


def _delete(path: Path) -> None:
    """Rename out of the iter_* namespace first (atomic), then delete: a kill mid-way leaves garbage that
    is recognisably ours, never a half-deleted iteration."""
    doomed = path.with_name(DELETING + path.name)
    os.rename(path, doomed)
    files = sorted(p for p in doomed.rglob("*") if p.is_file())
    if files:
        files[0].unlink()
    crash_point("mg-during-delete")
    shutil.rmtree(doomed)


def prepare_megatron_root(out, source, overwrite: bool) -> MegatronPlan:
    """Check `out` for hf-to-megatron and finish any interrupted replacement there (see the module docstring)."""
    root = Path(out)
    check_not_source(root, source, "--hf")
    marker = _existing(root, "megatron", overwrite)
    if marker is None:
        return MegatronPlan(root, 0)
    iterations = _iterations(root)
    foreign = sorted(p.name for p in iterations.values() if not (p / f"{ITERATION_RECORD}.json").is_file())
    if foreign:
        raise ConversionError(f"--out {root} holds iterations the converter did not write ({foreign[0]}: a training "
                              "run saved on top of the conversion); choose another --out")
    latest = _latest(root)
    if latest is not None and latest not in iterations:
        raise ConversionError(f"{root / LATEST} names iteration {latest}, which is missing: choose another --out")
    garbage = [p for i, p in iterations.items() if i != latest]
    garbage += [p for p in root.iterdir() if p.name.startswith(DELETING) or (p.name.startswith("iter_")
                                                                            and p.name.endswith(".tmp"))]
    if garbage:
        for p in garbage:
            shutil.rmtree(p)
        say(f"finished an interrupted conversion into {root}: removed {', '.join(sorted(p.name for p in garbage))}")
    if latest is None:
        say(f"an earlier conversion into {root} did not finish; starting it again")
        return MegatronPlan(root, 0)
    if not overwrite:
        _refuse_without_overwrite(root, marker)
    return MegatronPlan(root, latest + 1, [iterations[latest]])


def begin_megatron_root(plan: MegatronPlan, rec: dict) -> None:
    """Before the first save into a new root: mark it, so a killed first conversion is recognisably ours."""
    plan.root.mkdir(parents=True, exist_ok=True)
    if read_marker(plan.root) is None:
        write_json_atomic(plan.root / MARKER, {**rec, "iteration": None})


def finish_megatron_root(plan: MegatronPlan, rec: dict) -> None:
    """After `latest` names the new iteration: update the marker, delete the replaced iteration."""
    write_json_atomic(plan.root / MARKER, {**rec, "iteration": plan.iteration})
    crash_point("mg-after-latest")
    for old in plan.old:
        _delete(old)


# ---- HF folders ----------------------------------------------------------------------------
def _siblings(out: Path, tag: str) -> list[Path]:
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(out.name + tag) and p.is_dir())


def _complete(folder: Path) -> bool:
    try:
        return read_marker(folder) is not None
    except ConversionError:
        return False


def recover_hf_folder(out) -> None:
    """Finish or undo an interrupted HF swap at `out` and remove its leftovers (one line when it acts)."""
    out = Path(out)
    tmps, olds = _siblings(out, TMP_TAG), _siblings(out, OLD_TAG)
    if not tmps and not olds:
        return
    if not out.exists():
        new = [t for t in tmps if _complete(t)]
        if new:
            os.rename(new[-1], out)
            say(f"restored {out}: moved the new export into place (its replacement was interrupted)")
        elif olds:
            os.rename(olds[-1], out)
            say(f"restored {out}: put the previous export back (its replacement was interrupted)")
        _fsync_dir(out.parent)
    leftovers = [p for p in tmps + olds if p.exists()]
    for p in leftovers:
        shutil.rmtree(p)
    if leftovers:
        say(f"removed leftovers of an interrupted export: {', '.join(p.name for p in leftovers)}")


def check_hf_folder(out, source, overwrite: bool) -> None:
    """Check `out` for megatron-to-hf (finishing an interrupted replacement there first)."""
    out = Path(out)
    check_not_source(out, source, "--ckpt")
    recover_hf_folder(out)
    marker = _existing(out, "hf", overwrite)
    if marker is not None:
        unknown = sorted(set(os.listdir(out)) - set(marker.get("files", [])) - {MARKER})
        if unknown:
            raise ConversionError(f"--out {out} holds files the converter did not write ({unknown[0]}): move them "
                                  "or choose another --out")
        if not overwrite:
            _refuse_without_overwrite(out, marker)


def prepare_hf_folder(out, source, overwrite: bool) -> Path:
    """`check_hf_folder`, then the empty folder to build the export in (beside `out`)."""
    check_hf_folder(out, source, overwrite)
    out = Path(out)
    tmp = out.with_name(f"{out.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def publish_hf_folder(tmp: Path, out, rec: dict) -> Path:
    """Mark the finished export in `tmp` (last write: a marked tmp folder is complete) and swap it in."""
    out = Path(out)
    for p in tmp.iterdir():  # the data is on disk before the marker says it is complete
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    write_json_atomic(tmp / MARKER, {**rec, "files": sorted(os.listdir(tmp))})
    _fsync_dir(tmp)
    crash_point("hf-before-swap")
    old = None
    if out.exists():
        old = out.with_name(out.name + OLD_TAG + tmp.name.rsplit("-", 1)[-1])
        os.rename(out, old)
        crash_point("hf-between-renames")
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    crash_point("hf-after-swap")
    if old is not None:
        shutil.rmtree(old)
    return out
