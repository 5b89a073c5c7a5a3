"""Image-text corpora as WebDataset tar shards, and the writers that build them.

Layout of a corpus directory (what megatron-energon / webdataset read):

    shard-000000.tar      members {key}.png|jpg (image), {key}.txt (caption, UTF-8), {key}.json (metadata)
    shard-000001.tar      ...
    index.json            manifest: shard names and record counts, the writer's skip report

Keys are 9-digit running numbers (no dots: webdataset splits key and field at the first dot of the file
name). Each shard is written as `shard-XXXXXX.tar.tmp` and renamed when complete, and index.json is
written last (tmp + rename), so an interrupted writer never leaves a shard that looks complete. The
record counts in index.json also let the reader count records lost to a truncated shard.

For megatron-energon, run `energon prepare <dir>` once on the directory (it builds energon's own index
and asks for the sample type: CaptioningSample with image <- png/jpg, caption <- txt).

Writers validate what they write (the image decodes, the caption is non-empty, meta is a JSON object)
and count rejects in a SkipReport, but they do not apply the size rules of ImagePreprocessConfig: a corpus
does not depend on the model size it will feed; the reader applies those.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from PIL import Image

from megatron_xomni.data.decode import DecodeFailed, decode_pillow, probe_header_size
from megatron_xomni.data.preprocess import default_max_pixels, pixel_cap_message
from megatron_xomni.data.report import SkipReason, SkipReport

MANIFEST_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_EXT = "txt"
META_EXT = "json"
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm"}


@dataclass
class ShardInfo:
    """One finished shard."""

    # file name relative to the corpus directory
    name: str
    # number of records (keys) written to it
    count: int


@dataclass
class CorpusManifest:
    """Contents of index.json."""

    shards: list[ShardInfo] = field(default_factory=list)
    # the writer's report: records it refused (corrupt source images, missing captions, ...)
    write_report: dict = field(default_factory=dict)
    format: str = "webdataset"
    version: int = 1

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def save(self, corpus_dir: str | os.PathLike) -> None:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["fields"] = {"image": list(IMAGE_EXTS), "caption": CAPTION_EXT, "meta": META_EXT}
        path = Path(corpus_dir) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, corpus_dir: str | os.PathLike) -> "CorpusManifest":
        path = Path(corpus_dir) / MANIFEST_NAME
        try:
            d = json.loads(path.read_text())
            shards = [ShardInfo(str(s["name"]), int(s["count"])) for s in d["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a valid corpus manifest ({exc}); rewrite the corpus or delete it") from None
        return cls(shards=shards, write_report=d.get("write_report", {}), format=d.get("format", "webdataset"))


def image_ext_of(data: bytes) -> str | None:
    """File extension for encoded image bytes, from the magic bytes; None if unknown."""
    probe = probe_header_size(data)
    return _FORMAT_EXT.get(probe[0]) if probe else None


class CorpusWriter:
    """Append (image, caption, meta) records to WebDataset shards in `out_dir`.

    Use as a context manager (or call close()); close() writes index.json and returns the manifest.
    Refused records are counted in `self.report` (never dropped silently).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        samples_per_shard: int = 1000,
        max_shard_bytes: float = 1e9,
        image_format: str = "png",
        jpeg_quality: int = 95,
        overwrite: bool = False,
        validate: bool = True,
        max_pixels: int | None = None,
    ):
        """
        out_dir: corpus directory (created).  samples_per_shard / max_shard_bytes: a new shard starts when
        either is reached.  image_format: "png" (lossless) or "jpg", used when encoding PIL images (encoded
        bytes are stored as given).  overwrite: replace an existing corpus in out_dir.  validate: decode
        every image and check caption/meta before writing (False stores bytes as given, e.g. to build
        test corpora with planted bad records).  max_pixels: images declaring more pixels are refused
        (too_large) before they are decoded or encoded; default 64 megapixels or $XOMNI_MAX_IMAGE_PIXELS.
        """
        import webdataset as wds

        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = [p for p in self.out_dir.iterdir() if p.name == MANIFEST_NAME or p.name.startswith("shard-")]
        if existing and not overwrite:
            raise ValueError(f"{self.out_dir} already holds a corpus ({existing[0].name}); pass overwrite=True or pick another dir")
        for p in existing:
            p.unlink() if p.is_file() else shutil.rmtree(p)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.validate = validate
        self.max_pixels = default_max_pixels() if max_pixels is None else int(max_pixels)
        self.report = SkipReport()
        self.shards: list[ShardInfo] = []
        self._next_key = 0
        self._closed = False
        self._aborting = False
        self._sink = wds.ShardWriter(
            str(self.out_dir / (SHARD_PATTERN + ".tmp")),
            maxcount=samples_per_shard,
            maxsize=max_shard_bytes,
            post=self._finish_shard,
            verbose=0,
        )

    def _finish_shard(self, tmp_name: str) -> None:
        """ShardWriter callback after a shard is closed: rename tmp -> final (or drop it if empty)."""
        count = self._sink.count
        if self._aborting:
            return  # leave the .tmp name: a shard cut short by an exception must not look finished
        if count == 0:
            os.remove(tmp_name)
            return
        final = tmp_name[: -len(".tmp")]
        os.replace(tmp_name, final)
        self.shards.append(ShardInfo(os.path.basename(final), count))

    def _encode(self, image: Image.Image) -> tuple[bytes, str]:
        buf = io.BytesIO()
        if self.image_format == "png":
            # PNG stores these modes losslessly; anything else (P, CMYK, I;16, ...) becomes RGB
            image = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
            image.save(buf, format="PNG")
        else:
            image.convert("RGB").save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue(), self.image_format

    def add(
        self,
        image: Image.Image | bytes,
        caption: str,
        meta: dict[str, Any] | None = None,
        source: str | None = None,
        image_ext: str | None = None,
    ) -> str | None:
        """Write one record; returns its key, or None when it was refused (and counted in self.report).

        source: name used in the report for a refused record (e.g. a file path).  image_ext: extension to
        store encoded bytes under when it cannot be read from the bytes (only needed with validate=False).
        """
        if self._closed:
            raise ValueError("CorpusWriter is closed; create a new writer to add records")
        where = source or f"record {self.report.seen}"
        meta = {} if meta is None else meta
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if self.validate:
                try:
                    decode_pillow(data, max_pixels=self.max_pixels)
                except DecodeFailed as exc:
                    self.report.skip(exc.reason, where, str(exc))
                    return None
            # the bytes' own format wins over a file name's suffix; image_ext covers unreadable bytes
            ext = image_ext_of(data) or image_ext
            if ext is None:
                raise ValueError(f"{where}: cannot tell the image format from the bytes; pass image_ext='jpg'/'png'/...")
        elif isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                self.report.skip(SkipReason.ZERO_SIZE, where, f"image size {image.size}")
                return None
            if image.width * image.height > self.max_pixels:
                self.report.skip(SkipReason.TOO_LARGE, where, pixel_cap_message(image.height, image.width, self.max_pixels))
                return None
            data, ext = self._encode(image)
        else:
            raise ValueError(f"{where}: image must be a PIL image or encoded bytes, got {type(image).__name__}")
        if self.validate:
            if not isinstance(caption, str) or not caption.strip():
                self.report.skip(SkipReason.MISSING_CAPTION, where, f"caption {caption!r}")
                return None
            if not isinstance(meta, dict):
                self.report.skip(SkipReason.BAD_METADATA, where, f"meta is a {type(meta).__name__}, not a dict")
                return None
        try:
            meta_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            self.report.skip(SkipReason.BAD_METADATA, where, f"meta is not JSON-serialisable: {exc}")
            return None
        key = f"{self._next_key:09d}"
        sample = {"__key__": key, ext: data, META_EXT: meta_bytes}
        if caption is not None:
            sample[CAPTION_EXT] = caption.encode("utf-8") if isinstance(caption, str) else bytes(caption)
        self._sink.write(sample)
        self._next_key += 1
        self.report.count_yielded()
        return key

    def close(self) -> CorpusManifest:
        """Finish the last shard and write index.json; returns the manifest."""
        if not self._closed:
            self._sink.close()
            self._closed = True
            self.manifest = CorpusManifest(shards=list(self.shards), write_report=self.report.to_dict())
            self.manifest.save(self.out_dir)
        return self.manifest

    def __enter__(self) -> "CorpusWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # keep the finished shards but write no manifest: a failed run must not look complete
            self._aborting = True
            self._sink.close()
            self._closed = True


def write_corpus(
    samples: Iterable[tuple[Image.Image | bytes, str, dict | None]],
    out_dir: str | os.PathLike,
    **writer_kwargs,
) -> CorpusManifest:
    """Write (image, caption, meta) tuples; image is a PIL image or encoded bytes. kwargs: CorpusWriter's."""
    with CorpusWriter(out_dir, **writer_kwargs) as writer:
        for image, caption, meta in samples:
            writer.add(image, caption, meta)
    return writer.manifest


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def folder_images(image_dir: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files (by suffix, IMAGE_EXTS) under `image_dir`, sorted."""
    root = Path(image_dir)
    if not root.is_dir():
        raise ValueError(f"image_dir {root} is not a directory")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def write_folder_corpus(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recursive: bool = True,
    on_item: Optional[Callable[[], None]] = None,
    **writer_kwargs,
) -> CorpusManifest:
    """Write every image under `image_dir` with its same-name .txt caption (and optional same-name .json meta).

    Images are stored as their original bytes (no re-encode). An image without caption is counted as
    missing_caption in the manifest's write_report. meta gets "source": the path relative to image_dir.
    on_item: called once per image file handled (progress).
    """
    root = Path(image_dir)
    files = folder_images(root, recursive)
    with CorpusWriter(out_dir, **writer_kwargs) as writer:
        for path in files:
            if on_item is not None:
                on_item()
            rel = str(path.relative_to(root))
            cap_path, meta_path = path.with_suffix(".txt"), path.with_suffix(".json")
            caption = cap_path.read_text(encoding="utf-8", errors="replace").strip() if cap_path.is_file() else None
            if not caption:
                writer.report.skip(SkipReason.MISSING_CAPTION, rel, f"no non-empty {cap_path.name}")
                continue
            meta: dict = {}
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                except ValueError as exc:
                    writer.report.skip(SkipReason.BAD_METADATA, rel, f"{meta_path.name}: {exc}")
                    continue
                if not isinstance(meta, dict):
                    writer.report.skip(SkipReason.BAD_METADATA, rel, f"{meta_path.name} is not a JSON object")
                    continue
            data = _read_bytes(path)
            if data is None:
                writer.report.skip(SkipReason.MISSING_IMAGE, rel, "unreadable file")
                continue
            writer.add(data, caption, {**meta, "source": rel}, source=rel, image_ext=path.suffix.lower().lstrip("."))
    return writer.manifest


def write_jsonl_corpus(
    jsonl_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    on_item: Optional[Callable[[], None]] = None,
    **writer_kwargs,
) -> CorpusManifest:
    """Write the records of a JSONL file of {"image": path, "caption": str, ...}.

    Relative image paths are resolved against image_root (default: the JSONL's directory). Every other
    field of a line goes into meta, plus "source": the image path as written. Bad lines are counted in
    the manifest's write_report (bad_metadata / missing_image / missing_caption / image reasons).
    on_item: called once per non-blank line handled (progress).
    """
    jsonl_path = Path(jsonl_path)
    root = Path(image_root) if image_root is not None else jsonl_path.parent
    with CorpusWriter(out_dir, **writer_kwargs) as writer, jsonl_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if on_item is not None:
                on_item()
            where = f"{jsonl_path.name}:{lineno}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                writer.report.skip(SkipReason.BAD_METADATA, where, f"not JSON: {exc}")
                continue
            if not isinstance(row, dict):
                writer.report.skip(SkipReason.BAD_METADATA, where, "line is not a JSON object")
                continue
            image_ref = row.pop("image", None)
            caption = row.pop("caption", None)
            if not isinstance(image_ref, str) or not image_ref:
                writer.report.skip(SkipReason.MISSING_IMAGE, where, "no 'image' path")
                continue
            if not isinstance(caption, str) or not caption.strip():
                writer.report.skip(SkipReason.MISSING_CAPTION, where, f"caption {caption!r}")
                continue
            path = Path(image_ref) if Path(image_ref).is_absolute() else root / image_ref
            data = _read_bytes(path)
            if data is None:
                writer.report.skip(SkipReason.MISSING_IMAGE, where, f"cannot read {path}")
                continue
            writer.add(data, caption, {**row, "source": image_ref}, source=where, image_ext=path.suffix.lower().lstrip(".") or None)
    return writer.manifest
