"""Cheap checks of the files a loader is about to read, with one-line errors that say what is wrong.

A loader calls these before it builds a model or starts a process group, so a missing, empty,
truncated or foreign file is reported as a `BadFile` (a ValueError: the CLIs print it as one
`error:` line, exit 2) instead of a traceback from deep inside torch, safetensors or diffusers.
Messages state the observed fault: a folder given for a file is "a folder", not "missing"; a
missing JSON key is "lacks the key", not "another config".

Only headers and sizes are read: a safetensors header, the dist-ckpt index and the first bytes
of each indexed item. Corruption inside tensor data of the right length is not detected here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format: every dist-ckpt item and common.pt start with it


class BadFile(ValueError):
    """A file or folder that cannot be what the loader expects; the message names it and the fix."""


def _tail(fix: str) -> str:
    return f"; {fix}" if fix else ""


def require_file(path, what: str, fix: str = "", allow_empty: bool = False) -> Path:
    """`path` as a Path, or BadFile if it is missing, a folder, or (unless allow_empty) 0 bytes."""
    p = Path(path)
    if p.is_dir():
        raise BadFile(f"{what} {p} is a folder, not a file{_tail(fix)}")
    if not p.exists():
        raise BadFile(f"{what} {p} does not exist{_tail(fix)}")
    if not p.is_file():
        raise BadFile(f"{what} {p} is not a regular file{_tail(fix)}")
    if not allow_empty and p.stat().st_size == 0:
        raise BadFile(f"{what} {p} is empty (0 bytes){_tail(fix)}")
    return p


def require_dir(path, what: str, fix: str = "") -> Path:
    """`path` as a Path, or BadFile if it is missing or a file."""
    p = Path(path)
    if p.is_file():
        raise BadFile(f"{what} {p} is a file, not a folder{_tail(fix)}")
    if not p.is_dir():
        raise BadFile(f"{what} {p} does not exist{_tail(fix)}")
    return p


def read_json(path, what: str, fix: str = "", required: Iterable[str] = ()) -> dict:
    """A JSON object from `path`, or BadFile: missing / folder / empty / not UTF-8 / not JSON / not an
    object / lacking one of the `required` keys."""
    p = require_file(path, what, fix)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadFile(f"{what} {p} is binary, not JSON text{_tail(fix)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){_tail(fix)}") from None
    if not isinstance(data, dict):
        raise BadFile(f"{what} {p} holds a JSON {type(data).__name__}, not an object{_tail(fix)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise BadFile(f"{what} {p} lacks the key(s) {', '.join(map(repr, missing))}{_tail(fix)}")
    return data


def check_safetensors(path, what: str, fix: str = "") -> list[str]:
    """Tensor names of a safetensors file after parsing its header (which also checks that the file is
    as long as the header says), or BadFile: missing / folder / empty / truncated / not safetensors."""
    from safetensors import SafetensorError, safe_open

    p = require_file(path, what, fix)
    try:
        with safe_open(str(p), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        detail = str(e).split(":")[-1].strip() or type(e).__name__
        raise BadFile(f"{what} {p} is not a readable safetensors file ({detail}: truncated or not "
                      f"safetensors){_tail(fix)}") from None


def _starts_with(path: Path, offset: int, magic: bytes) -> bool:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(len(magic)) == magic


def check_dist_checkpoint(folder, fix: str = "") -> None:
    """A megatron-core dist-ckpt folder (torch_dist backend) is complete: metadata.json, the .metadata
    index, common.pt, and every indexed part file present, long enough, and holding torch.save data
    where the index points. BadFile names the first damaged part."""
    from torch.distributed.checkpoint import FileSystemReader

    d = require_dir(folder, "checkpoint folder", fix)
    read_json(d / "metadata.json", "checkpoint part", fix, required=("sharded_backend",))
    index = require_file(d / ".metadata", "checkpoint part", fix)
    try:
        meta = FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # an unpickling error of any kind: the index is damaged
        raise BadFile(f"checkpoint part {index} is not a checkpoint index ({type(e).__name__}){_tail(fix)}") from None
    common = require_file(d / "common.pt", "checkpoint part", fix)
    if not _starts_with(common, 0, _ZIP_MAGIC):
        raise BadFile(f"checkpoint part {common} is not torch.save data{_tail(fix)}")
    ends: dict[str, int] = {}
    for info in meta.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        part = require_file(d / name, "checkpoint part", fix)
        size = part.stat().st_size
        if size < end:
            raise BadFile(f"checkpoint part {part} has {size} bytes but the index needs {end}: it is truncated"
                          f"{_tail(fix)}")
    for info in meta.storage_data.values():
        if not getattr(info, "transform_descriptors", None) and not _starts_with(d / info.relative_path,
                                                                                   info.offset, _ZIP_MAGIC):
            raise BadFile(f"checkpoint part {d / info.relative_path} holds no tensor data at offset "
                          f"{info.offset} (overwritten or not from this checkpoint){_tail(fix)}")


def check_pretrained_folder(folder, weights: str, what: str, fix: str = "") -> None:
    """An HF / diffusers `save_pretrained` folder: config.json, and `weights` (e.g. model.safetensors)
    or its sharded form (`weights`.index.json naming every shard), each with a readable header."""
    d = require_dir(folder, what, fix)
    read_json(d / "config.json", f"{what} config", fix)
    index = d / f"{weights}.index.json"
    if index.exists():
        weight_map = read_json(index, f"{what} weight index", fix, required=("weight_map",))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadFile(f"{what} weight index {index} has an empty or malformed weight_map{_tail(fix)}")
        for shard in sorted(set(map(str, weight_map.values()))):
            if Path(shard).name != shard:
                raise BadFile(f"{what} weight index {index} names {shard!r}, not a file of {d}{_tail(fix)}")
            check_safetensors(d / shard, f"{what} weights", fix)
    else:
        check_safetensors(d / weights, f"{what} weights", fix)
