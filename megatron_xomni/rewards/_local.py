"""Shared checks for rewards that load Hugging Face checkpoints from local directories only."""
from __future__ import annotations

from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_model_dir(model_dir: str | Path | None, reward: str) -> str:
    """Validate that ``model_dir`` is a local checkpoint folder (rewards never download)."""
    if not model_dir:
        raise ValueError(f"reward {reward!r} needs model_dir=<local checkpoint folder>; weights are never downloaded")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"reward {reward!r}: {path} is not a local Hugging Face checkpoint (no config.json); "
            "save_pretrained / download it there first"
        )
    return str(path)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """'float32' / 'bfloat16' / 'float16' -> torch dtype; None keeps the checkpoint's own dtype."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
