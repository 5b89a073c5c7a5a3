"""`xomni corpus`: build a WebDataset corpus from a folder of captioned images or from a JSONL.

    xomni corpus --images photos/ --out corpora/photos        # photos/a.png + photos/a.txt (caption), ...
    xomni corpus --jsonl pairs.jsonl --out corpora/pairs      # {"image": "img/a.jpg", "caption": "..."} per line

Images are stored as their original bytes; records that cannot be used (no caption, an image that
does not decode, a bad line) are skipped and counted in the manifest's write_report, which is
printed at the end. An output folder that is not empty is refused unless --overwrite (which
replaces the corpus files in it: index.json and shard-*.tar).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megatron_xomni.data.corpus import MANIFEST_NAME, CorpusManifest, folder_images, write_folder_corpus, write_jsonl_corpus
from megatron_xomni.data.report import SkipReport
from megatron_xomni.file_checks import require_dir, require_file


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, refused in one line when it is a file, or not empty without `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pick a folder for the corpus")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace the corpus in it, or pick a new folder")
    return out


def _jsonl_lines(path: Path) -> int:
    require_file(path, "JSONL", 'expected {"image": path, "caption": ...} per line')
    try:
        with path.open(encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
    except UnicodeDecodeError:
        raise ValueError(f"JSONL {path} is not UTF-8 text; expected {{\"image\": path, \"caption\": ...}} per line") from None
    if n == 0:
        raise ValueError(f"JSONL {path} holds no lines; expected {{\"image\": path, \"caption\": ...}} per line")
    return n


def build_corpus(out: str | os.PathLike, images: Optional[str] = None, jsonl: Optional[str] = None,
                 image_root: Optional[str] = None, overwrite: bool = False, recursive: bool = True,
                 samples_per_shard: int = 1000, progress: bool = True) -> CorpusManifest:
    """Write the corpus; one-line ValueError for bad input, or when no record at all could be written."""
    if (images is None) == (jsonl is None):
        raise ValueError("give exactly one of --images DIR (images with same-stem .txt captions) or --jsonl FILE")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard} must be >= 1")
    out = check_output(out, overwrite)
    if images is not None:
        root = require_dir(images, "--images folder", "pass a folder of images with same-stem .txt captions")
        total = len(folder_images(root, recursive))
        if total == 0:
            raise ValueError(f"--images {root} holds no image files (.png, .jpg, .webp, ...)")
    else:
        if image_root is not None:
            require_dir(image_root, "--image-root folder")
        total = _jsonl_lines(Path(jsonl))
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img" if images else "line", desc="corpus", disable=not progress, dynamic_ncols=True)
    try:
        kw = dict(on_item=bar.update, samples_per_shard=samples_per_shard, overwrite=True)
        if images is not None:
            manifest = write_folder_corpus(images, out, recursive=recursive, **kw)
        else:
            manifest = write_jsonl_corpus(jsonl, out, image_root=image_root, **kw)
    finally:
        bar.close()
    if manifest.num_samples == 0:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # an empty corpus must not look complete
        report = SkipReport.from_dict(manifest.write_report)
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items()))
        raise ValueError(f"no record could be written from {images or jsonl}: {report.num_skipped} skipped ({reasons})")
    return manifest


def summary(manifest: CorpusManifest, out: str | os.PathLike) -> str:
    """What `xomni corpus` prints: records and shards written, then the skip report."""
    report = SkipReport.from_dict(manifest.write_report)
    return (f"corpus {out}: {manifest.num_samples} records in {len(manifest.shards)} shard(s)\n{report}")
