"""Building typed config dataclasses from saved dicts (JSON files beside checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """`cls(**data)`, refusing keys the dataclass does not have (a file from another version)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}: the config was written by another "
                         "version; remove them")
    return cls(**data)
