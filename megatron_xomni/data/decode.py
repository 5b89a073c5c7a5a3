"""Image decoding: Pillow on CPU, NVIDIA DALI (nvImageCodec / nvJPEG) on GPU, with per-record failure reasons.

Both decoders turn encoded bytes into the preprocessed tensor of `preprocess.py` and raise `DecodeFailed`
(or `ImageRejected`) carrying the `SkipReason`, so a reader can count every bad record instead of crashing:

- header first (Pillow parses only the header, cheap): empty bytes, unknown format, a declared size of 0,
  and the size rules (too small / aspect ratio) are decided before any pixel is decoded;
- then the pixels: Pillow's full decode, or DALI's GPU decode followed by a Pillow-exact resize on the GPU
  (`resize_uint8_tensor`). If DALI fails on a record, the record goes through Pillow, which either decodes it
  (counted in `DaliDecoder.fallbacks`) or names the reason.

EXIF orientation is applied by both (Pillow's `ImageOps.exif_transpose`, DALI's `adjust_orientation`), so
camera photos come out upright; X-Omni's released preprocessing does not do this, set exif_transpose=False
to match it bit for bit on rotated JPEGs.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_xomni.data.preprocess import (ImagePreprocessConfig, ImageRejected, default_max_pixels, normalize_uint8,
                                            pixel_cap_message, preprocess, resize_uint8_tensor, target_size)
from megatron_xomni.data.report import SkipReason
from megatron_xomni.file_checks import require_file

_EXIF_ORIENTATION = 0x0112


class DecodeFailed(ValueError):
    """Encoded bytes that cannot become an image; `reason` is the SkipReason to count it under."""

    def __init__(self, reason: SkipReason, message: str):
        super().__init__(message)
        self.reason = reason


def probe_header_size(data: bytes) -> tuple[str, int | None, int | None] | None:
    """(format, width, height) read straight from a PNG/GIF/BMP/JPEG/WebP(VP8X) header, else None.

    Pillow refuses images whose header declares a zero side with the same error it gives for random bytes;
    this probe tells the two apart (zero_size vs undecodable) and recognises a known format whose body is
    broken (corrupt). Width/height are None when the format is known but the size field is unreadable.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return "PNG", w, h
        return "PNG", None, None
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) >= 10:
            w, h = struct.unpack("<HH", data[6:10])
            return "GIF", w, h
        return "GIF", None, None
    if data[:2] == b"BM":
        if len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return "BMP", abs(w), abs(h)
        return "BMP", None, None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X" and len(data) >= 30:
            w = 1 + int.from_bytes(data[24:27], "little")
            h = 1 + int.from_bytes(data[27:30], "little")
            return "WEBP", w, h
        return "WEBP", None, None
    if data[:2] == b"\xff\xd8":
        return ("JPEG",) + _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int | None, int | None]:
    """Walk the JPEG marker segments up to the first start-of-frame and read its size."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None, None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # standalone markers carry no length
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + seg_len
    return None, None


def _failure_from_exception(exc: Exception, data: bytes) -> DecodeFailed:
    """Map a decoder exception to a SkipReason (the message is kept as the detail)."""
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS)
        return DecodeFailed(SkipReason.TOO_LARGE, msg)
    if isinstance(exc, UnidentifiedImageError):
        probe = probe_header_size(data)
        if probe is None:
            return DecodeFailed(SkipReason.UNDECODABLE, f"unknown image format ({data[:8]!r}...)")
        fmt, w, h = probe
        if w == 0 or h == 0:
            return DecodeFailed(SkipReason.ZERO_SIZE, f"{fmt} header declares size {w}x{h}")
        return DecodeFailed(SkipReason.CORRUPT, f"{fmt} header recognised but Pillow cannot read it: {msg}")
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
        return DecodeFailed(SkipReason.TRUNCATED, msg)
    return DecodeFailed(SkipReason.CORRUPT, msg)


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Parse only the header of encoded image bytes (pixels are decoded lazily); raises DecodeFailed.

    An image declaring more than `max_pixels` (default: `default_max_pixels()`, 64 megapixels) is refused
    here, from its header, so it is never decoded."""
    if len(data) == 0:
        raise DecodeFailed(SkipReason.EMPTY_FILE, "image file has 0 bytes")
    cap = default_max_pixels() if max_pixels is None else int(max_pixels)
    probe = probe_header_size(data)
    if probe is not None and probe[1] and probe[2] and probe[1] * probe[2] > cap:
        raise DecodeFailed(SkipReason.TOO_LARGE, pixel_cap_message(probe[2], probe[1], cap))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about e.g. odd EXIF; the record is judged below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked by Image.open on the header
        m = re.search(r"\((\d+) pixels\)", str(exc))
        if m and int(m.group(1)) > cap:
            raise DecodeFailed(SkipReason.TOO_LARGE, pixel_cap_message(None, None, cap, int(m.group(1)))) from None
        raise _failure_from_exception(exc, data) from None
    except Exception as exc:  # any parser error is a property of this record, not a bug of the run
        raise _failure_from_exception(exc, data) from None
    if img.width == 0 or img.height == 0:
        raise DecodeFailed(SkipReason.ZERO_SIZE, f"image has size {img.width}x{img.height}")
    if img.width * img.height > cap:
        raise DecodeFailed(SkipReason.TOO_LARGE, pixel_cap_message(img.height, img.width, cap))
    return img


def open_image_file(path, max_pixels: int | None = None) -> Image.Image:
    """`open_image` of a file named by a user: DecodeFailed messages name the file (missing, a folder,
    empty, not an image, above the pixel cap); pixels are decoded lazily."""
    p = Path(path)
    try:
        require_file(p, "image", "pass an image file (PNG, JPEG, WebP, ...)")
    except ValueError as e:
        raise DecodeFailed(SkipReason.MISSING_IMAGE, str(e)) from None
    try:
        return open_image(p.read_bytes(), max_pixels)
    except DecodeFailed as e:
        raise DecodeFailed(e.reason, f"image {p}: {e}") from None


def oriented_size(img: Image.Image, exif_transpose: bool = True) -> tuple[int, int]:
    """(height, width) of the image as it will be after EXIF orientation, from the header only."""
    w, h = img.size
    if exif_transpose:
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # unreadable EXIF: Pillow's exif_transpose ignores it too
            orientation = 1
        if orientation in (5, 6, 7, 8):  # the transposing / rotating-by-90 orientations swap the sides
            return w, h
    return h, w


def decode_pillow(data: bytes, exif_transpose: bool = True, max_pixels: int | None = None) -> Image.Image:
    """Fully decode encoded bytes to an RGB PIL image (upright if exif_transpose); raises DecodeFailed."""
    img = open_image(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img = img.convert("RGB")
    except Exception as exc:  # truncated / broken pixel data in this record
        raise _failure_from_exception(exc, data) from None
    return img


class PillowDecoder:
    """CPU decoder: bytes -> preprocessed FloatTensor [3, H, W] on the CPU."""

    name = "pillow"

    def __init__(self, cfg: ImagePreprocessConfig | None = None, exif_transpose: bool = True):
        self.cfg = cfg or ImagePreprocessConfig()
        self.exif_transpose = exif_transpose

    def __call__(self, data: bytes) -> torch.Tensor:
        # size rules on the header first: rejected images are never decoded
        target_size(*oriented_size(open_image(data, self.cfg.max_pixels), self.exif_transpose), self.cfg)
        return preprocess(decode_pillow(data, self.exif_transpose, self.cfg.max_pixels), self.cfg)


def dali_available(require_cuda: bool = True) -> bool:
    """True when nvidia.dali imports (and, with require_cuda, a CUDA device is visible)."""
    if require_cuda and not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # missing, or built for another CUDA: treat as unavailable
        return False
    return True


class DaliDecoder:
    """DALI decoder: `fn.decoders.image` then the Pillow-exact resize (`resize_uint8_tensor`) on the same device.

    device="gpu" (default) decodes with DALI's "mixed" backend (nvJPEG / the hardware JPEG decoder) and
    returns CUDA tensors, so use it in the main process (DataLoader num_workers=0): CUDA cannot be
    initialised in forked DataLoader workers. device="cpu" runs DALI's CPU backend (libjpeg-turbo,
    libpng) and returns CPU tensors; it needs no GPU. One record per DALI run keeps per-record error
    accounting exact.
    """

    name = "dali"

    def __init__(
        self,
        cfg: ImagePreprocessConfig | None = None,
        exif_transpose: bool = True,
        device: str = "gpu",
        device_id: int | None = None,
        num_threads: int = 2,
    ):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliDecoder device must be 'gpu' or 'cpu', got {device!r}")
        if not dali_available(require_cuda=device == "gpu"):
            raise ValueError(
                "decoder='dali' needs nvidia.dali (and a CUDA device for device='gpu'); install "
                "nvidia-dali-cuda120 on a GPU machine or use decoder='pillow' / 'auto'"
            )
        self.cfg = cfg or ImagePreprocessConfig()
        self.exif_transpose = exif_transpose
        self.device = device
        if device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else device_id
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
            self.torch_device = torch.device("cpu")
        self.num_threads = num_threads
        self.fallbacks = 0  # records DALI could not decode but Pillow could
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        exif = self.exif_transpose
        backend = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def
        def decode_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            # fancy upsampling = libjpeg's default chroma upsampling, which is what Pillow uses
            kwargs = {} if exif else {"adjust_orientation": False}
            return fn.decoders.image(encoded, device=backend, output_type=types.RGB, jpeg_fancy_upsampling=True, **kwargs)

        # synchronous, depth-1 pipeline: each run() consumes exactly the one record fed before it
        pipe = decode_pipe(
            batch_size=1,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        pipe.build()
        return pipe

    def decode_hwc(self, data: bytes) -> torch.Tensor:
        """Decode to a uint8 tensor [h, w, 3] on self.torch_device; raises whatever DALI raises."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            (out,) = self._pipe.run()
            tensor = out[0]
            result = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=self.torch_device)
            stream = torch.cuda.current_stream(self.device_id) if self.device == "gpu" else None
            feed_ndarray(tensor, result, cuda_stream=stream)
        except Exception:
            self._pipe = None  # DALI invalidates a pipeline after a failed run; rebuild on the next record
            raise
        return result

    def __call__(self, data: bytes) -> torch.Tensor:
        target_size(*oriented_size(open_image(data, self.cfg.max_pixels), self.exif_transpose), self.cfg)
        try:
            chw = self.decode_hwc(data).permute(2, 0, 1)
        except Exception:
            # DALI gives no per-record reason; Pillow either decodes the record or says why it is bad
            image = decode_pillow(data, self.exif_transpose, self.cfg.max_pixels)
            self.fallbacks += 1
            chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).to(self.torch_device)
        size = target_size(chw.shape[1], chw.shape[2], self.cfg)
        return normalize_uint8(resize_uint8_tensor(chw, size, self.cfg.resample), self.cfg).contiguous()


def make_decoder(kind: str = "auto", cfg: ImagePreprocessConfig | None = None, exif_transpose: bool = True):
    """"pillow", "dali", or "auto" (DALI where it imports and CUDA exists, else Pillow)."""
    if kind == "auto":
        kind = "dali" if dali_available() else "pillow"
    if kind == "pillow":
        return PillowDecoder(cfg, exif_transpose)
    if kind == "dali":
        return DaliDecoder(cfg, exif_transpose)
    raise ValueError(f"decoder must be 'auto', 'pillow' or 'dali', got {kind!r}")


__all__ = [
    "DecodeFailed",
    "DaliDecoder",
    "ImageRejected",
    "PillowDecoder",
    "dali_available",
    "decode_pillow",
    "make_decoder",
    "open_image",
    "open_image_file",
    "oriented_size",
    "probe_header_size",
]
