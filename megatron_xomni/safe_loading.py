"""Checkpoint loading that cannot run code.

torch's distributed checkpoint (DCP) reads every checkpoint's `.metadata` file with plain
`pickle.load` and the byte objects inside it with `torch.load(weights_only=False)`, so a crafted
checkpoint runs whatever it names. `install()` makes both safe for the whole process:

- `.metadata` is read by `RestrictedUnpickler`, which builds only DCP's own metadata classes and
  a handful of plain containers; anything else is refused with `UnsafeCheckpointError` (one line);
- byte objects are read with `torch.load(weights_only=True)`.

Writing is untouched. `check_metadata(dir)` validates one checkpoint folder up front, so a bad
file is named before any process group does collective work on it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

METADATA_FILE = ".metadata"

# What a DCP .metadata pickle may build: the classes (dataclasses and enums) defined in these modules,
# a few named helpers, torch dtypes/layouts/memory formats and plain containers.
_CLASS_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
}
_NEVER = {"SavePlanner", "LoadPlanner", "FileSystemReader", "FileSystemWriter", "FileSystemBase"}
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),  # DCP records the checkpoint id; building a path runs nothing
    ("pathlib", "PurePosixPath"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file references something other than plain checkpoint metadata."""


def _is_torch_enum(module: str, name: str) -> bool:
    import torch

    if module != "torch":
        return False
    value = getattr(torch, name, None)
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, dtypes/layouts and plain containers."""

    source = "checkpoint metadata"

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or _is_torch_enum(module, name):
            return super().find_class(module, name)
        if module in _CLASS_MODULES and name not in _NEVER:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # a class defined there, not an import
                return obj
        raise UnsafeCheckpointError(
            f"{self.source} references {module}.{name}, which is not checkpoint metadata: refusing to load it "
            "(the file was modified or is not a checkpoint; restore it from a trusted copy)"
        )


def restricted_load(file, source: str = "checkpoint metadata"):
    unpickler = RestrictedUnpickler(file)
    unpickler.source = source
    return unpickler.load()


class _SafePickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
    DEFAULT_PROTOCOL = pickle.DEFAULT_PROTOCOL
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file, *args, **kwargs):
        return restricted_load(file, f"{getattr(file, 'name', 'checkpoint')} ")

    @staticmethod
    def loads(data, *args, **kwargs):
        return restricted_load(io.BytesIO(data))


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    import torch
    from torch.distributed.checkpoint._traverse import set_element  # the helper DCP's own load_bytes uses

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


_INSTALLED = False


def install() -> None:
    """Make every DCP load in this process refuse code (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import torch.distributed.checkpoint.default_planner as default_planner
    import torch.distributed.checkpoint.filesystem as filesystem

    filesystem.pickle = _SafePickle
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes
    _INSTALLED = True


def check_metadata(ckpt_dir) -> None:
    """Raise UnsafeCheckpointError / a one-line ValueError if `ckpt_dir/.metadata` is not plain metadata."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: {ckpt_dir} is not a complete distributed checkpoint")
    try:
        with open(path, "rb") as f:
            restricted_load(f, str(path))
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated, zero-byte or garbage
        raise ValueError(f"{path} is unreadable ({type(e).__name__}): the checkpoint is damaged; "
                         "use an earlier iteration or a trusted copy") from None


def dcp_load(state_dict: dict, folder) -> None:
    """torch.distributed.checkpoint.load through the safe readers; a refused object is one line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    install()
    check_metadata(folder)
    try:
        dcp.load(state_dict, checkpoint_id=str(folder))
    except CheckpointException as e:  # a BaseException: turn a refusal into the one-line error
        text = str(e)
        if "Weights only load failed" in text or "not checkpoint metadata" in text:
            raise UnsafeCheckpointError(f"{folder} holds an object that is not plain data: refusing to load it "
                                        "(the file was modified; restore it from a trusted copy)") from None
        raise
