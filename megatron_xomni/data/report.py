"""Skip accounting: every record a reader or writer sees is either yielded or counted here.

A corpus of hundreds of millions of web images always holds some bad records. The loaders never crash
on them and never drop one silently: each skipped record is counted under exactly one `SkipReason`, with
a few example keys kept for debugging. Reports from several DataLoader workers or ranks are merged with
`SkipReport.merge`, saved with `save` and printed with `str(report)`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class SkipReason(str, Enum):
    """Why a record was not yielded. The string value is what appears in saved reports."""

    EMPTY_FILE = "empty_file"  # the image member has zero bytes
    TRUNCATED = "truncated"  # image bytes end early, or the tar shard itself ends early
    CORRUPT = "corrupt"  # a known image format whose data cannot be decoded (bad CRC, broken stream)
    UNDECODABLE = "undecodable"  # bytes that are no image format the decoder knows
    ZERO_SIZE = "zero_size"  # the image header declares a width or height of 0
    MISSING_IMAGE = "missing_image"  # the record (or the JSONL line / folder entry) has no image
    MISSING_CAPTION = "missing_caption"  # no caption, or a caption that is empty / only whitespace
    BAD_METADATA = "bad_metadata"  # the .json metadata (or a JSONL line) is not a JSON object
    TOO_SMALL = "too_small"  # short side below ImagePreprocessConfig.min_short_reject
    ASPECT_RATIO = "aspect_ratio"  # long / short side above ImagePreprocessConfig.max_aspect_ratio
    TOO_LARGE = "too_large"  # the header declares more pixels than ImagePreprocessConfig.max_pixels


@dataclass
class SkipReport:
    """Counts of yielded and skipped records.

    Invariant kept by the loaders: `seen == yielded + sum(skipped.values())`.
    """

    # records handed to a consumer (DataLoader / training loop / writer output)
    yielded: int = 0
    # skipped records per reason (string value of SkipReason); only reasons that occurred appear
    skipped: dict[str, int] = field(default_factory=dict)
    # up to `max_examples` (key, detail) pairs per reason, so a bad record can be found again
    examples: dict[str, list[list[str]]] = field(default_factory=dict)
    # shards that ended early (tar truncated or unreadable), with what was detected
    broken_shards: dict[str, str] = field(default_factory=dict)
    # how many example keys to keep per reason
    max_examples: int = 5

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def seen(self) -> int:
        return self.yielded + self.num_skipped

    def count_yielded(self, n: int = 1) -> None:
        self.yielded += n

    def skip(self, reason: SkipReason, key: str, detail: str = "", n: int = 1) -> None:
        """Count `n` skipped records under `reason`; `key` names the (first) record for debugging."""
        if n <= 0:
            return
        name = SkipReason(reason).value
        self.skipped[name] = self.skipped.get(name, 0) + n
        ex = self.examples.setdefault(name, [])
        if len(ex) < self.max_examples:
            ex.append([key, detail[:200]])

    def mark_broken_shard(self, shard: str, detail: str) -> None:
        self.broken_shards[shard] = detail[:200]

    def merge(self, other: "SkipReport") -> "SkipReport":
        """Add `other`'s counts into this report (in place) and return self."""
        self.yielded += other.yielded
        for name, n in other.skipped.items():
            self.skipped[name] = self.skipped.get(name, 0) + n
        for name, ex in other.examples.items():
            mine = self.examples.setdefault(name, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])
        self.broken_shards.update(other.broken_shards)
        return self

    def to_dict(self) -> dict:
        return {
            "seen": self.seen,
            "yielded": self.yielded,
            "skipped_total": self.num_skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": self.examples,
            "broken_shards": self.broken_shards,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        unknown = set(d.get("skipped", {})) - {r.value for r in SkipReason}
        if unknown:
            raise ValueError(f"skip report has unknown reasons {sorted(unknown)}; it was not written by this loader")
        return cls(
            yielded=int(d.get("yielded", 0)),
            skipped={k: int(v) for k, v in d.get("skipped", {}).items()},
            examples={k: [list(e) for e in v] for k, v in d.get("examples", {}).items()},
            broken_shards=dict(d.get("broken_shards", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (atomically: tmp file + rename, so a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SkipReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def merge_files(cls, paths) -> "SkipReport":
        """Merge saved reports, e.g. the per-worker files a `CorpusDataset` writes to its report_dir."""
        total = cls()
        for p in paths:
            total.merge(cls.load(p))
        return total

    def __str__(self) -> str:
        lines = [f"records seen {self.seen}: yielded {self.yielded}, skipped {self.num_skipped}"]
        for name, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            first = self.examples.get(name, [["", ""]])[0]
            lines.append(f"  {name:<16} {n:>8}   e.g. {first[0]} {first[1]}".rstrip())
        for shard, detail in sorted(self.broken_shards.items()):
            lines.append(f"  broken shard {shard}: {detail}")
        return "\n".join(lines)
