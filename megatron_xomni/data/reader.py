"""Reading WebDataset corpora: records -> preprocessed samples, with every bad record counted.

Shards are read with the standard library's streaming `tarfile` rather than webdataset's pipeline because
per-record accounting needs to know exactly where a shard broke: a record is the run of consecutive members
sharing a key (webdataset's grouping rule: key = file name up to the first dot of its base name).

- A tar that ends in the middle of a member, or whose end-of-archive marker (two zero blocks) is missing,
  is a truncated shard: the record being read is counted as `truncated`, and when index.json knows how many
  records the shard had, every record lost after the break is counted as `truncated` too.
- Every other record is either yielded or counted under one SkipReason (see report.py).

Sharding over DataLoader workers and distributed ranks is deterministic: consumer c of N (N = ranks x
workers, c = rank x workers + worker) gets whole shards (shard i -> c = i mod N) when there are at least
4 N shards, else single records ((shard index + record position) mod N), which covers every record exactly
once even for a one-shard corpus.
"""
from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator

import torch

from megatron_xomni.data.corpus import CAPTION_EXT, IMAGE_EXTS, MANIFEST_NAME, META_EXT, CorpusManifest
from megatron_xomni.data.decode import DecodeFailed, make_decoder
from megatron_xomni.data.preprocess import ImagePreprocessConfig, ImageRejected
from megatron_xomni.data.report import SkipReason, SkipReport

_BLOCK = 512


def split_key(member_name: str) -> tuple[str, str]:
    """'dir/000001.seg.jpg' -> ('dir/000001', 'seg.jpg'), webdataset's key / field split."""
    head, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_records(path: str | os.PathLike) -> Iterator[tuple[int, str, dict[str, bytes], str | None]]:
    """Yield (position, key, {field: bytes}, error) for each record of one tar shard, in order.

    error is None for a complete record. When the shard breaks, the record being read is yielded with
    error set (its fields may be incomplete), then iteration ends; position counts records from 0.
    """
    path = Path(path)
    key, parts, pos, end_of_data = None, {}, 0, 0
    error = None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_key(member.name)
                if k != key and key is not None:
                    yield pos, key, parts, None
                    pos += 1
                    parts = {}
                key = k
                fobj = tf.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                parts[ext] = data
                end_of_data = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"shard ends early: {type(exc).__name__}: {exc}"
    if error is None:
        # tarfile stops quietly when a shard is cut exactly between members; a complete tar has two
        # zero blocks after the last member, so their absence means the end of the shard is missing
        with open(path, "rb") as f:
            f.seek(end_of_data)
            trailer = f.read(2 * _BLOCK)
        if len(trailer) < 2 * _BLOCK or trailer.strip(b"\0"):
            error = "shard ends early: no end-of-archive marker after the last readable member (cut or damaged header)"
    if key is not None:
        yield pos, key, parts, error
    elif error is not None:
        yield pos, "", {}, error


def _resolve_shards(path) -> tuple[list[Path], list[int | None]]:
    """Shard paths and their expected record counts (None when there is no manifest)."""
    if isinstance(path, (list, tuple)):
        return [Path(p) for p in path], [None] * len(path)
    path = Path(path)
    if path.is_file():
        return [path], [None]
    if not path.is_dir():
        raise ValueError(f"corpus path {path} does not exist; pass a corpus directory, a .tar shard or a list of shards")
    if (path / MANIFEST_NAME).is_file():
        manifest = CorpusManifest.load(path)
        return [path / s.name for s in manifest.shards], [s.count for s in manifest.shards]
    shards = sorted(path.glob("*.tar"))
    if not shards:
        raise ValueError(f"{path} has neither {MANIFEST_NAME} nor .tar shards; write it with megatron_xomni.data.corpus")
    return shards, [None] * len(shards)


def _owner_fn(num_shards: int, num_consumers: int, split_by: str):
    """Resolve the split: ("shard" | "record", fn(shard_slot, position) -> consumer id).

    shard_slot is the shard's place in the (possibly shuffled) order; the rule depends only on the shard
    count and the number of consumers, so every consumer derives the same assignment independently.
    """
    if split_by == "auto":
        split_by = "shard" if num_shards >= 4 * num_consumers else "record"
    if split_by == "shard":
        return split_by, lambda slot, pos: slot % num_consumers
    if split_by == "record":
        return split_by, lambda slot, pos: (slot + pos) % num_consumers
    raise ValueError(f"split_by must be 'auto', 'shard' or 'record', got {split_by!r}")


class CorpusReader:
    """Iterate a corpus as samples {key, pixels [3, H, W], caption, meta, shard}.

    path: corpus directory (with index.json, or just *.tar files), a single .tar, or a list of .tar paths.
    decoder: "auto" (DALI on GPU where available, else Pillow), "pillow", "dali", or a decoder object
    (callable bytes -> tensor raising DecodeFailed / ImageRejected, e.g. DaliDecoder(cfg, device="cpu")).
    All skipped records are counted in `self.report` (a SkipReport).
    """

    def __init__(
        self,
        path,
        preprocess_cfg: ImagePreprocessConfig | None = None,
        decoder="auto",
        exif_transpose: bool = True,
        report: SkipReport | None = None,
    ):
        self.shards, self.expected_counts = _resolve_shards(path)
        self.cfg = preprocess_cfg or ImagePreprocessConfig()
        self.decoder_kind = decoder if isinstance(decoder, str) else getattr(decoder, "name", "custom")
        self.exif_transpose = exif_transpose
        self.report = report if report is not None else SkipReport()
        self._decoder = None if isinstance(decoder, str) else decoder

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = make_decoder(self.decoder_kind, self.cfg, self.exif_transpose)
        return self._decoder

    def __iter__(self) -> Iterator[dict]:
        return self.iter_samples()

    def iter_samples(
        self,
        consumer: int = 0,
        num_consumers: int = 1,
        split_by: str = "auto",
        shuffle_seed: int | None = None,
    ) -> Iterator[dict]:
        """Samples owned by `consumer` of `num_consumers` (see the module docstring for the split).

        shuffle_seed: when set, the shard order is permuted with random.Random(shuffle_seed) first
        (pass seed + epoch for a new order every epoch; every consumer must pass the same value).
        """
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer must be in [0, {num_consumers}), got {consumer}")
        order = list(range(len(self.shards)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        mode, owner = _owner_fn(len(order), num_consumers, split_by)
        for slot, shard_idx in enumerate(order):
            if mode == "shard" and owner(slot, 0) != consumer:
                continue  # whole-shard split and the shard is someone else's: do not even open it
            yield from self._iter_shard(shard_idx, slot, owner, consumer)

    def _iter_shard(self, shard_idx: int, slot: int, owner, consumer: int) -> Iterator[dict]:
        shard = self.shards[shard_idx]
        name = shard.name
        expected = self.expected_counts[shard_idx]
        seen = 0
        if not shard.is_file():
            self.report.mark_broken_shard(name, "shard file is missing")
            records = iter(())
        else:
            records = iter_tar_records(shard)
        for pos, key, parts, error in records:
            seen = pos + 1
            if error is not None:
                self.report.mark_broken_shard(name, error)
            if owner(slot, pos) != consumer:
                continue
            if error is not None:
                self.report.skip(SkipReason.TRUNCATED, f"{name}/{key or '?'}", error)
                continue
            sample = self._make_sample(name, key, parts)
            if sample is not None:
                self.report.count_yielded()
                yield sample
        if expected is not None and seen < expected:
            # records the manifest promises but the shard no longer holds: lost to truncation
            if name not in self.report.broken_shards:
                self.report.mark_broken_shard(name, f"holds {seen} of {expected} records")
            lost = sum(1 for pos in range(seen, expected) if owner(slot, pos) == consumer)
            self.report.skip(SkipReason.TRUNCATED, f"{name}/records {seen}..{expected - 1}", "lost with the end of the shard", n=lost)

    def _make_sample(self, shard: str, key: str, parts: dict[str, bytes]) -> dict | None:
        """Turn one record into a sample, or count why not and return None."""
        where = f"{shard}/{key}"
        fields = parse_record(parts, where, self.report)
        if fields is None:
            return None
        image, caption, meta = fields
        try:
            pixels = self.decoder(image)
        except (DecodeFailed, ImageRejected) as exc:
            self.report.skip(exc.reason, where, str(exc))
            return None
        return {"key": key, "pixels": pixels, "caption": caption, "meta": meta, "shard": shard}


def parse_record(parts: dict[str, bytes], where: str, report: SkipReport) -> tuple[bytes, str, dict] | None:
    """(image bytes, caption, meta) of one record's fields, or None after counting in `report` why
    not (no image member, no / empty / non-UTF-8 caption, metadata that is not a JSON object)."""
    image_ext = next((e for e in parts if e in IMAGE_EXTS), None)
    if image_ext is None:
        report.skip(SkipReason.MISSING_IMAGE, where, f"fields {sorted(parts)}")
        return None
    raw_caption = parts.get(CAPTION_EXT)
    try:
        caption = raw_caption.decode("utf-8").strip() if raw_caption is not None else ""
    except UnicodeDecodeError:
        report.skip(SkipReason.MISSING_CAPTION, where, "caption is not UTF-8")
        return None
    if not caption:
        report.skip(SkipReason.MISSING_CAPTION, where, "no caption" if raw_caption is None else "empty caption")
        return None
    meta: dict = {}
    if META_EXT in parts:
        try:
            meta = json.loads(parts[META_EXT].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            report.skip(SkipReason.BAD_METADATA, where, str(exc))
            return None
        if not isinstance(meta, dict):
            report.skip(SkipReason.BAD_METADATA, where, f"meta is a JSON {type(meta).__name__}")
            return None
    return parts[image_ext], caption, meta


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CorpusDataset(torch.utils.data.IterableDataset):
    """torch IterableDataset over a corpus, split deterministically over ranks and DataLoader workers.

    Each worker has its own SkipReport; with report_dir set, each saves it at the end of an epoch as
    report_dir/skips-rank{R}-worker{W}.json (merge them with SkipReport.merge_files). With num_workers=0 the
    report of the last epoch is also at `self.last_report`. Samples have pixels of varying size, so use
    batch_size=None (or a collate that packs them). "auto" decodes with Pillow inside worker processes,
    because CUDA cannot be used in forked workers; decoder="dali" needs num_workers=0.
    """

    def __init__(
        self,
        path,
        preprocess_cfg: ImagePreprocessConfig | None = None,
        decoder: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
        split_by: str = "auto",
        shuffle_shards: bool = False,
        seed: int = 0,
        report_dir: str | os.PathLike | None = None,
        exif_transpose: bool = True,
    ):
        super().__init__()
        dist_rank, dist_world = _dist_rank_world()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.path = path
        self.cfg = preprocess_cfg or ImagePreprocessConfig()
        self.decoder = decoder
        self.split_by = split_by
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self.exif_transpose = exif_transpose
        self.last_report: SkipReport | None = None
        _resolve_shards(path)  # fail early, in the main process, on a bad path

    def set_epoch(self, epoch: int) -> None:
        """Change the shard order for the next iteration (only with shuffle_shards=True)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        decoder = self.decoder
        if info is not None:
            if decoder == "dali":
                raise ValueError("decoder='dali' cannot run in DataLoader workers (CUDA in forked processes); use num_workers=0")
            decoder = "pillow" if decoder == "auto" else decoder
        reader = CorpusReader(self.path, self.cfg, decoder, self.exif_transpose)
        self.last_report = reader.report
        try:
            yield from reader.iter_samples(
                consumer=self.rank * num_workers + worker,
                num_consumers=self.world_size * num_workers,
                split_by=self.split_by,
                shuffle_seed=self.seed + self.epoch if self.shuffle_shards else None,
            )
        finally:
            if self.report_dir is not None:
                reader.report.save(self.report_dir / f"skips-rank{self.rank:05d}-worker{worker:03d}.json")
