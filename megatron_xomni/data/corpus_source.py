"""Image-text sources: any WebDataset corpus (or the built-in world) as records by global index, and
the deterministic, resumable training batches the image trainers read from them.

Record `g` of a source is addressed like a prompt (data/prompts.py): a corpus of N records is read
in passes (epoch = g // N); with `shuffle`, each pass visits the shards in its own seeded order and
the records of a shard in a seeded order too, so a batch touches one or two shards, not the whole
corpus. Random access uses the shard's tar headers (read once per shard, seeking over the data),
so batch `step` is computed directly - a resumed run starts at its step without reading the steps
before it, and the batch does not depend on the number of ranks: global batch `step` holds records
step*B .. step*B+B-1, and rank r of W takes its contiguous slice of B/W.

Bad records (undecodable or truncated images, missing captions, bad metadata, images the size rules
refuse, records a truncated shard lost) are skipped and counted once each in `source.report`
(a SkipReport); the slot is filled by the next readable record of the stream (g+1, g+2, ...), so
the batch keeps its size and stays deterministic (that record then appears twice in the pass).

Preprocessing (`BatchShape`): `fixed(size)` resizes every image to cover size x size and centre-crops
it (the tiny presets); `xomni(cfg)` uses X-Omni's any-resolution rules (data/preprocess.py): the
batch takes the size the rules give its first record, and the other images are resized to cover it
and centre-cropped, so a batch stacks. Pixels are float [B, 3, H, W] in [-1, 1].
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from megatron_xomni.data.decode import DecodeFailed, decode_pillow
from megatron_xomni.data.preprocess import ImagePreprocessConfig, check_size, target_size
from megatron_xomni.data.reader import _resolve_shards, parse_record, split_key
from megatron_xomni.data.report import SkipReason, SkipReport


def pil_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> float [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass(frozen=True)
class BatchShape:
    """How records become a batch of one size: `size` for fixed squares, else X-Omni's rules `rules`."""

    size: Optional[int] = None
    rules: Optional[ImagePreprocessConfig] = None

    @classmethod
    def fixed(cls, size: int) -> "BatchShape":
        if not isinstance(size, int) or size < 16 or size % 16:
            raise ValueError(f"image size {size!r} must be a multiple of 16 (one image token = 16 px), e.g. 64")
        return cls(size=size)

    @classmethod
    def xomni(cls, rules: ImagePreprocessConfig | None = None) -> "BatchShape":
        return cls(rules=rules or ImagePreprocessConfig())

    def reject(self, image: Image.Image) -> Optional[SkipReason]:
        """Why the size rules refuse this image (None: accepted). Fixed squares accept any size."""
        return None if self.rules is None else check_size(image.height, image.width, self.rules)

    def size_for(self, image: Image.Image) -> tuple[int, int]:
        return (self.size, self.size) if self.rules is None else target_size(image.height, image.width, self.rules)


def fit(image: Image.Image, hw: tuple[int, int]) -> Image.Image:
    """Resize to cover (H, W) and centre-crop (bicubic); an image of that size is returned as is."""
    if image.size == (hw[1], hw[0]):
        return image
    return ImageOps.fit(image, (hw[1], hw[0]), method=Image.Resampling.BICUBIC)


class ImageTextSource:
    """Records (RGB image, caption, meta) by global index; subclasses implement `_record`, which
    returns None for a bad record after counting it in `self.report`."""

    name: str = "images"
    num_records: Optional[int] = None  # records per pass; None: endless

    def __init__(self) -> None:
        self.report = SkipReport()

    def _record(self, index: int, shape: BatchShape):
        raise NotImplementedError

    def resolve(self, index: int, shape: BatchShape) -> tuple[int, tuple[Image.Image, str, dict]]:
        """(global index read, record) for slot `index`: the record, or the next readable one."""
        limit = self.num_records or 1
        for j in range(limit):
            rec = self._record(index + j, shape)
            if rec is not None:
                return index + j, rec
        raise ValueError(f"{self.name}: none of its {limit} records is readable ({self.report.to_dict()['skipped']}); "
                         "rebuild it (xomni corpus) or check the image size rules")

    def batch(self, step: int, batch_size: int, shape: BatchShape, rank: int = 0, world_size: int = 1) -> dict:
        """Rank `rank`'s slice of global batch `step`: {"pixels" [b, 3, H, W], "prompts", "metas", "index"}."""
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} data-parallel ranks")
        per = batch_size // world_size
        first = step * batch_size + rank * per
        return self.gather(range(first, first + per), shape, anchor=step * batch_size)

    def gather(self, indices: Iterable[int], shape: BatchShape, anchor: Optional[int] = None) -> dict:
        """The records of `indices` as one batch; its size comes from record `anchor` (default: the
        first index) under X-Omni's rules, or is the fixed square."""
        indices = list(indices)
        records = [self.resolve(i, shape) for i in indices]
        lead = records[0] if anchor is None or anchor == indices[0] else self.resolve(anchor, shape)
        hw = shape.size_for(lead[1][0])
        return {"pixels": pil_to_pixels([fit(img, hw) for _, (img, _, _) in records]),
                "prompts": [cap for _, (_, cap, _) in records], "metas": [meta for _, (_, _, meta) in records],
                "index": torch.tensor(indices), "read": torch.tensor([g for g, _ in records])}

    def batches(self, batch_size: int, shape: BatchShape, rank: int = 0, world_size: int = 1, start_step: int = 0):
        """Endless `batch(step)` from `start_step` on."""
        step = start_step
        while True:
            yield self.batch(step, batch_size, shape, rank, world_size)
            step += 1


def _scan_shard(path: Path) -> tuple[list[dict[str, tuple[int, int]]], list[str], Optional[str]]:
    """Per complete record (in tar order): {field: (data offset, size)}, the keys, and an error if the
    tar breaks."""
    records: list[dict[str, tuple[int, int]]] = []
    keys: list[str] = []
    error = None
    try:
        with tarfile.open(path, mode="r:") as tf:  # seekable: headers only, the data is skipped
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    records.append({})
                records[-1][ext] = (member.offset_data, member.size)
        size = path.stat().st_size
        if records and max(o + n for o, n in records[-1].values()) > size:
            error = "shard ends inside its last record"
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"shard ends early: {type(exc).__name__}: {exc}"
    if error:  # the record being read when the shard broke may miss members: it is lost too (as in reader.py)
        records, keys = records[:-1], keys[:-1]
    return records, keys, error


class CorpusSource(ImageTextSource):
    """A WebDataset corpus directory (index.json + shard-*.tar, as `xomni corpus` writes), a .tar, or
    a list of .tar paths. Record counts come from index.json; without it every shard is scanned once."""

    def __init__(self, path, seed: int = 0, shuffle: bool = True, exif_transpose: bool = True,
                 max_pixels: Optional[int] = None, cached_shards: int = 8) -> None:
        super().__init__()
        self.shards, counts = _resolve_shards(path)
        self.name = str(path)
        self._scans: OrderedDict[int, tuple] = OrderedDict()
        self._cached = max(1, cached_shards)
        if any(c is None for c in counts):
            counts = [len(self._scan(i)[0]) for i in range(len(self.shards))]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_records = int(self.counts.sum())
        if self.num_records == 0:
            raise ValueError(f"corpus {path} holds no records; build one with `xomni corpus`")
        self.seed, self.shuffle, self.exif_transpose, self.max_pixels = seed, shuffle, exif_transpose, max_pixels
        self._bad: set[tuple[int, int]] = set()
        self._epoch: Optional[tuple[int, np.ndarray, np.ndarray]] = None

    def _scan(self, shard: int) -> tuple:
        if shard not in self._scans:
            path = self.shards[shard]
            if not path.is_file():
                self.report.mark_broken_shard(path.name, "shard file is missing")
                self._scans[shard] = ([], [], "missing")
            else:
                records, keys, error = _scan_shard(path)
                if error:
                    self.report.mark_broken_shard(path.name, error)
                self._scans[shard] = (records, keys, error)
            while len(self._scans) > self._cached:
                self._scans.popitem(last=False)
        self._scans.move_to_end(shard)
        return self._scans[shard]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, record position in the shard) that global index `index` reads."""
        epoch, k = divmod(int(index), self.num_records)
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)) if self.shuffle \
                else np.arange(len(self.shards))
            self._epoch = (epoch, order, np.cumsum(self.counts[order]))
        _, order, ends = self._epoch
        slot = int(np.searchsorted(ends, k, side="right"))
        shard = int(order[slot])
        pos = k - (int(ends[slot - 1]) if slot else 0)
        if self.shuffle:
            pos = int(np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.counts[shard]))[pos])
        return shard, pos

    def _record(self, index: int, shape: BatchShape):
        shard, pos = self.locate(index)
        if (shard, pos) in self._bad:
            return None
        rec = self._read(shard, pos, shape)
        if rec is None:
            self._bad.add((shard, pos))  # counted once; later visits skip it silently
        return rec

    def _read(self, shard: int, pos: int, shape: BatchShape):
        records, keys, _ = self._scan(shard)
        name = self.shards[shard].name
        if pos >= len(records):
            self.report.skip(SkipReason.TRUNCATED, f"{name}/record {pos}", "lost with the end of the shard")
            return None
        where = f"{name}/{keys[pos]}"
        try:
            with open(self.shards[shard], "rb") as f:
                parts = {}
                for ext, (offset, size) in records[pos].items():
                    f.seek(offset)
                    parts[ext] = f.read(size)
        except OSError as exc:
            self.report.skip(SkipReason.TRUNCATED, where, str(exc))
            return None
        fields = parse_record(parts, where, self.report)
        if fields is None:
            return None
        data, caption, meta = fields
        try:
            image = decode_pillow(data, self.exif_transpose, self.max_pixels)
        except DecodeFailed as exc:
            self.report.skip(exc.reason, where, str(exc))
            return None
        reason = shape.reject(image)
        if reason is not None:
            self.report.skip(reason, where, f"image {image.height}x{image.width} refused by the size rules")
            return None
        self.report.count_yielded()
        return image, caption, meta


def image_text_source(spec: str | os.PathLike, seed: int = 0, size: int = 64, shuffle: bool = True) -> ImageTextSource:
    """"world" (the built-in world's images at `size`, world seed `seed`) or a corpus path."""
    if str(spec) == "world":
        from megatron_xomni.data.world_source import WorldImageSource

        return WorldImageSource(seed=seed, size=size)
    return CorpusSource(spec, seed=seed, shuffle=shuffle)
