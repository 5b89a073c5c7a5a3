"""X-Omni's any-resolution image preprocessing, as a typed config and pure functions.

The rule (X-Omni defaults in brackets), applied to an image of height h and width w:

1. Reject (raise `ImageRejected`) when a side is 0 (`zero_size`), when h * w exceeds `max_pixels`
   [64 megapixels] (`too_large`), when the short side is below `min_short_reject` [128] (`too_small`),
   or when long / short > `max_aspect_ratio` [3] (`aspect_ratio`). The checks use the original size
   (as the header declares it: every reader checks before decoding a pixel), in that order.
2. Upscale only if the short side is below `min_short` [384]: both sides are multiplied by
   min_short / short (kept as floats, aspect ratio preserved). An image whose short side is already
   >= min_short is never upscaled (and never downscaled to min_short either).
3. Cap the long side: if the (possibly upscaled) long side exceeds `max_long` [1152], both sides are
   multiplied by max_long / long. This runs after step 2, so the cap wins when the two conflict (only
   possible when min_short * max_aspect_ratio > max_long; with the defaults 384 * 3 = 1152, no conflict).
4. Round each side on its own to the nearest multiple of `multiple` [16]:
   side = round(side / multiple) * multiple with Python's `round`, i.e. ties go to the even multiple
   (392 -> 24.5 -> 24 -> 384, but 408 -> 25.5 -> 26 -> 416), exactly as X-Omni's released code does.
   Because min_short and max_long must be multiples of `multiple`, rounding never takes the short side
   below min_short (when no cap conflict) nor the long side above max_long. A side is never rounded to 0
   (at least one `multiple`). Rounding each side independently can change the aspect ratio slightly.
5. Resize with Pillow bicubic to (H, W), convert to float in [0, 1], normalise with mean = std = 0.5 into
   [-1, 1], channels first.

Examples with the defaults: 200x300 -> 384x576 (upscaled by 1.92); 2000x1000 -> 1152x576 (long side capped,
short side stays above 384 so no upscale); 500x700 -> 496x704 (no scaling, only rounding); 100x500 rejected.
Tokens per image = (H / 16) * (W / 16).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from megatron_xomni.data.report import SkipReason

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
MAX_PIXELS_ENV = "XOMNI_MAX_IMAGE_PIXELS"


def default_max_pixels() -> int:
    """The pixel cap of every image reader: 64 megapixels (64,000,000), or $XOMNI_MAX_IMAGE_PIXELS.

    A PNG of a few hundred KB can declare 20000 x 20000 pixels (1.2 GB as RGB, more once converted
    to floats); images above the cap are refused from their header, before any pixel is decoded."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return 64_000_000
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} must be a positive number of pixels (default 64000000)")
    return value


def pixel_cap_message(h: int | None, w: int | None, cap: int, pixels: int | None = None) -> str:
    """One line for an image above the cap (h, w from its header; or only its pixel count)."""
    what = f"image {h}x{w}" if h is not None and w is not None else "image"
    pixels = h * w if pixels is None else pixels
    return (f"{what} has {pixels:,} pixels, above the cap of {cap:,}: downscale it, or raise the cap "
            f"(ImagePreprocessConfig.max_pixels, ${MAX_PIXELS_ENV})")


class ImageRejected(ValueError):
    """An image the preprocessing rules refuse; `reason` says which rule (a SkipReason)."""

    def __init__(self, reason: SkipReason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Any-resolution resize + normalisation rules. Defaults are X-Omni's (SigLIP-VQ tokenizer input)."""

    # short side is scaled UP to this many pixels when it is smaller (never scaled down to it)
    min_short: int = 384
    # long side is scaled down to at most this many pixels
    max_long: int = 1152
    # both output sides are rounded to a multiple of this (the tokenizer's patch size)
    multiple: int = 16
    # images whose original short side is below this are rejected as too small
    min_short_reject: int = 128
    # images whose original long / short side ratio exceeds this are rejected
    max_aspect_ratio: float = 3.0
    # resampling filter of the resize: "bicubic" (X-Omni) or "bilinear"
    resample: str = "bicubic"
    # per-channel normalisation (x - mean) / std applied to pixels in [0, 1]; 0.5 / 0.5 maps to [-1, 1]
    mean: float = 0.5
    std: float = 0.5
    # images whose header declares more pixels than this are refused before decoding
    # (default: 64 megapixels, or $XOMNI_MAX_IMAGE_PIXELS; see default_max_pixels)
    max_pixels: int = field(default_factory=default_max_pixels)

    def __post_init__(self) -> None:
        for name in ("min_short", "max_long", "multiple", "min_short_reject", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ImagePreprocessConfig.{name} must be a positive int, got {getattr(self, name)}")
        if self.min_short % self.multiple or self.max_long % self.multiple:
            raise ValueError(
                f"min_short ({self.min_short}) and max_long ({self.max_long}) must be multiples of multiple "
                f"({self.multiple}) so rounding cannot break the size bounds; pick multiples of {self.multiple}"
            )
        if self.min_short > self.max_long:
            raise ValueError(f"min_short ({self.min_short}) must not exceed max_long ({self.max_long})")
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio must be >= 1 (long / short), got {self.max_aspect_ratio}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    @classmethod
    def tiny(cls) -> "ImagePreprocessConfig":
        """Scaled-down rules for tiny test models: 64 <= short, long <= 192, reject short < 32."""
        return cls(min_short=64, max_long=192, multiple=16, min_short_reject=32)


def check_size(h: int, w: int, cfg: ImagePreprocessConfig) -> SkipReason | None:
    """The rejection rule alone: the SkipReason an h x w image is rejected for, or None if accepted."""
    if h <= 0 or w <= 0:
        return SkipReason.ZERO_SIZE
    if h * w > cfg.max_pixels:
        return SkipReason.TOO_LARGE
    short, long = min(h, w), max(h, w)
    if short < cfg.min_short_reject:
        return SkipReason.TOO_SMALL
    if long / short > cfg.max_aspect_ratio:
        return SkipReason.ASPECT_RATIO
    return None


def target_size(h: int, w: int, cfg: ImagePreprocessConfig | None = None) -> tuple[int, int]:
    """Output (H, W) for an input of height h, width w (see the module docstring for the exact rule).

    Raises ImageRejected (a ValueError carrying `.reason`) when the image is rejected.
    """
    cfg = cfg or ImagePreprocessConfig()
    reason = check_size(h, w, cfg)
    if reason is SkipReason.TOO_LARGE:
        raise ImageRejected(reason, pixel_cap_message(h, w, cfg.max_pixels))
    if reason is not None:
        raise ImageRejected(
            reason,
            f"image {h}x{w} rejected ({reason.value}): need short side >= {cfg.min_short_reject} and "
            f"aspect ratio <= {cfg.max_aspect_ratio}",
        )
    th, tw = float(h), float(w)
    short = min(th, tw)
    if short < cfg.min_short:
        # same arithmetic order as X-Omni (side * (target / short)) so float ties round identically
        th, tw = th * (cfg.min_short / short), tw * (cfg.min_short / short)
    long = max(th, tw)
    if long > cfg.max_long:
        th, tw = th * (cfg.max_long / long), tw * (cfg.max_long / long)
    m = cfg.multiple
    return max(m, int(round(th / m)) * m), max(m, int(round(tw / m)) * m)


def normalize_uint8(chw: torch.Tensor, cfg: ImagePreprocessConfig) -> torch.Tensor:
    """uint8-valued [3, H, W] tensor (any float/int dtype, any device) -> float32 normalised tensor."""
    # make the (usually permuted HWC) input contiguous while it is still 1 byte per value: the float
    # arithmetic on a channels-last view is several times slower than on a contiguous tensor
    x = chw.contiguous().to(torch.float32)
    return x.div_(255.0).sub_(cfg.mean).div_(cfg.std)


def resize_pil(image: Image.Image, cfg: ImagePreprocessConfig | None = None) -> Image.Image:
    """Validate and resize an image to target_size with Pillow (RGB, not yet normalised)."""
    cfg = cfg or ImagePreprocessConfig()
    w, h = image.size
    H, W = target_size(h, w, cfg)  # before convert(): a lazily opened image is decoded only if accepted
    if image.mode != "RGB":
        image = image.convert("RGB")
    if (H, W) == (h, w):
        return image
    return image.resize((W, H), resample=_RESAMPLE[cfg.resample])


def preprocess(image: Image.Image, cfg: ImagePreprocessConfig | None = None) -> torch.Tensor:
    """PIL image -> FloatTensor [3, H, W] in [-1, 1] (with the default mean = std = 0.5).

    Raises ImageRejected for images the rules refuse.
    """
    cfg = cfg or ImagePreprocessConfig()
    resized = resize_pil(image, cfg)
    # numpy on the CPU: same float32 operations as normalize_uint8 (so bit-identical results) but without
    # torch's per-op thread dispatch, which dominates on small images and busy machines
    x = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)).astype(np.float32)
    x /= np.float32(255.0)
    x -= np.float32(cfg.mean)
    x /= np.float32(cfg.std)
    return torch.from_numpy(x)


def resize_uint8_tensor(chw: torch.Tensor, size: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """Resize a [3, h, w] tensor holding uint8 values to `size` = (H, W) the way Pillow does, on any device.

    Pillow resizes separably, horizontal pass first, and stores the intermediate image as uint8 (rounded
    and clipped); its bicubic kernel uses a = -0.5 and widens with the scale when shrinking (antialias).
    torch's antialiased interpolation uses the same kernels, so two 1-D passes with rounding in between
    reproduce Pillow to within one grey level. Returns float32 holding integer values in [0, 255].
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    H, W = size
    x = chw.to(torch.float32).unsqueeze(0)
    h, w = x.shape[-2:]
    if W != w:
        x = torch.nn.functional.interpolate(x, size=(h, W), mode=resample, antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    if H != h:
        x = torch.nn.functional.interpolate(x, size=(H, W), mode=resample, antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    return x.squeeze(0)
