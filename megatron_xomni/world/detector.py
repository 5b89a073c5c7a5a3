"""Deterministic GenEval-style detector and scorer for world images.

``score_image(image, meta)`` checks that an image shows what the prompt in ``meta`` asked
for.  It works on pixels only (``meta["include"]`` supplies the request, never the answer),
so it can score images produced by a model.

Detection, in plain image processing (OpenCV + numpy, no learned weights):
1. background colour = per-channel median of the 1-pixel image border;
2. foreground = pixels whose RGB distance to the background exceeds ``fg_threshold``
   (a third to a half of the way to any palette colour, far above moderate noise);
3. 8-connected components; blobs smaller than ``min_area_frac`` x short_side^2 are ignored;
4. colour = the palette colour whose direction from the background is closest (cosine) to
   the mean of the blob's most saturated half; blur only mixes in background, which keeps
   that direction, so blurred blobs keep their colour name (None below ``color_min_cos``);
5. shape = blurred-template fit: the blob's coverage map alpha (projection of each pixel
   onto background -> blob colour, in a window around the blob, excluding pixels nearer to
   other blobs) has a mass and a centroid that blur preserves; each world shape with that
   area and centroid, blurred by each of a few sigmas, is compared to alpha and the least
   squared error wins.  So blur does not turn every small shape into a "circle", as it does
   with thresholded outlines.  Fit quality = 1 - error / energy; below ``min_fit`` the shape
   is "unknown".  The reported box is the fitted template's box.

Requests (``meta["include"]``, one dict per requested object group, GenEval-like):
``{"shape": str, "count": int, "exact": bool, "color": str | None, "position": [relation, j] | None}``
- count: detections of that shape == count when ``exact`` (counting skill), else >= count;
- color: additionally that many detections of that shape have that colour;
- position: some detection matching this request is ``relation`` some detection matching
  request j, judged like GenEval: the centre offset along the relation's axis, reduced by
  ``position_slack`` x the summed object sizes on that axis, must point the right way and
  make up more than ``position_min_cos`` of the full centre distance.

Score: all-or-nothing per prompt, as GenEval (``score`` is 1.0 when every check passes,
else 0.0).  ``fraction`` is the share of checks passed, a denser signal for RL rewards.
The "text" skill is not scored here (OCR scores it elsewhere): its ``score`` and
``fraction`` are None and ``checks`` is empty.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np
from PIL import Image

from megatron_xomni.world.render import shape_coverage
from megatron_xomni.world.vocab import PALETTE, SHAPES

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
_RELATION_AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector; defaults are tuned for the world palette."""

    fg_threshold: float = 90.0  # RGB distance from the background above which a pixel is foreground
    min_area_frac: float = 0.01  # ignore blobs smaller than this fraction of short_side^2
    min_fit: float = 0.6  # below this template-fit quality the blob's shape is "unknown"
    color_min_cos: float = 0.95  # cosine to the nearest palette direction below which colour is None
    # (palette directions are >= 20 degrees apart; black text is 21 degrees from green)
    work_short_side: int = 128  # larger images are area-downscaled to this short side first (speed)
    window_pad: float = 0.35  # coverage window reaches this fraction of the blob size past it
    blur_fracs: tuple[float, ...] = (0.0, 0.03, 0.06, 0.1, 0.14, 0.19, 0.25)  # template blur sigmas / size
    position_slack: float = 0.1  # GenEval's threshold: fraction of summed sizes ignored in offsets
    position_min_cos: float = 0.5  # reduced axis offset / centre distance must exceed this


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"score_image needs a PIL image or an HxWx3 array, got an array of shape {arr.shape}")
    return arr.astype(np.float32)


def _background(arr: np.ndarray) -> np.ndarray:
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    return np.median(border, axis=0)


def _name_color(core: np.ndarray, bg: np.ndarray, min_cos: float) -> str | None:
    """Palette colour whose direction from the background is closest to the blob's.

    Blur mixes a colour with the background, which moves it along exactly that direction,
    so comparing directions (not distances) names even faint, blurred blobs correctly."""
    offset = core - bg
    norm = float(np.linalg.norm(offset))
    if norm == 0:
        return None
    cos = (_PALETTE_RGB - bg) @ offset / (np.linalg.norm(_PALETTE_RGB - bg, axis=1) * norm)
    best = int(np.argmax(cos))
    return _PALETTE_NAMES[best] if cos[best] >= min_cos else None


def _template_box(shape: str, mass: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """Box of the world shape with area ``mass`` and centroid (cx, cy).

    Blur preserves both the integral and the centroid of a blob, so these pin the template
    down without knowing the blur."""
    side = math.sqrt({"square": 1.0, "circle": 4 / math.pi}.get(shape, 2.0) * mass)
    top = cy - (2 * side / 3 if shape == "triangle" else side / 2)  # a triangle's centroid is 2/3 down
    return (cx - side / 2, top, cx + side / 2, top + side)


def _fit_shape(alpha: np.ndarray, allowed: np.ndarray, blur_fracs: tuple[float, ...]):
    """(shape, fit quality, box) of the blurred world-shape template closest to ``alpha``.

    ``alpha`` is the blob's coverage map (0 background .. 1 full colour).  For each shape
    the template has the blob's mass and centroid and is blurred by each candidate sigma
    (a fraction of its size); the best shape has the least squared error.  Quality is
    1 - error / energy, near 1 for a clean match."""
    height, width = alpha.shape
    alpha = (alpha * allowed).astype(np.float32)
    mass = float(alpha.sum())
    energy = float((alpha**2).sum())
    if mass <= 1.0 or energy <= 0:
        return "unknown", 0.0, None
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = float((alpha * (xs + 0.5)).sum() / mass), float((alpha * (ys + 0.5)).sum() / mass)
    best = ("unknown", -math.inf, None)
    for shape in SHAPES:
        box = _template_box(shape, mass, cx, cy)
        base = shape_coverage(shape, box, width, height)
        side = box[2] - box[0]
        for frac in blur_fracs:
            template = cv2.GaussianBlur(base, (0, 0), frac * side) if frac > 0 else base
            error = float((((alpha - template) * allowed) ** 2).sum())
            quality = 1.0 - error / energy
            if quality > best[1]:
                best = (shape, quality, box)
    return best


def detect_objects(image: Image.Image | np.ndarray, config: DetectorConfig | None = None) -> list[dict[str, Any]]:
    """Blobs in ``image`` as dicts {shape, color, box [x0,y0,x1,y1), area, quality}."""
    config = config or DetectorConfig()
    arr = _to_array(image)
    full_height, full_width = arr.shape[:2]
    # World objects are >= a fifth of the short side, so a 128 px short side keeps them
    # >= ~25 px: plenty for the fit, and the cost no longer grows with resolution.
    scale = min(1.0, config.work_short_side / min(full_height, full_width))
    if scale < 1.0:
        size = (max(1, round(full_width * scale)), max(1, round(full_height * scale)))
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    height, width = arr.shape[:2]
    bg = _background(arr)
    dist_bg = np.linalg.norm(arr - bg, axis=2)
    foreground = (dist_bg > config.fg_threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    min_area = config.min_area_frac * min(height, width) ** 2
    detections = []
    for k in range(1, count):  # label 0 is the background
        if stats[k, cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, w, h = (int(v) for v in stats[k, :4])
        blob = labels[y : y + h, x : x + w] == k
        pixels, strength = arr[y : y + h, x : x + w][blob], dist_bg[y : y + h, x : x + w][blob]
        # Colour from the blob's strongest half: away from edges that blur mixed with background.
        core = pixels[strength >= np.median(strength)].mean(axis=0)
        color = _name_color(core, bg, config.color_min_cos)
        # Coverage map in a window around the blob (blurred tails reach past the threshold),
        # keeping only pixels nearer to this blob than to any other so neighbours never mix.
        pad = math.ceil(config.window_pad * max(w, h)) + 1
        x0, y0, x1, y1 = max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad)
        crop_labels = labels[y0:y1, x0:x1]
        to_self = cv2.distanceTransform((crop_labels != k).astype(np.uint8), cv2.DIST_L2, 3)
        others = (crop_labels != k) & (crop_labels != 0)
        to_other = cv2.distanceTransform((~others).astype(np.uint8), cv2.DIST_L2, 3) if others.any() else np.inf
        allowed = ((to_self <= to_other) & (to_self <= pad)).astype(np.float32)
        target = _PALETTE_RGB[_PALETTE_NAMES.index(color)] if color is not None else core
        direction = target - bg
        alpha = ((arr[y0:y1, x0:x1] - bg) @ direction) / max(float(direction @ direction), 1e-6)
        shape, quality, box = _fit_shape(alpha, allowed, config.blur_fracs)
        if box is None:
            continue
        if quality < config.min_fit:
            shape = "unknown"
        # Back to the caller's pixel grid (the work grid may be downscaled).
        box = [round((box[0] + x0) / scale), round((box[1] + y0) / scale), round((box[2] + x0) / scale), round((box[3] + y0) / scale)]
        area = int(round(stats[k, cv2.CC_STAT_AREA] / scale**2))
        detections.append({"shape": shape, "color": color, "box": box, "area": area, "quality": round(quality, 4)})
    return detections


def relation_holds(box_a: list[int], box_b: list[int], relation: str, config: DetectorConfig | None = None) -> bool:
    """Whether box_a is ``relation`` ("left of", "right of", "above", "below") box_b."""
    config = config or DetectorConfig()
    if relation not in _RELATION_AXIS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {tuple(_RELATION_AXIS)}")
    axis, sign = _RELATION_AXIS[relation]
    offset = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    norm = math.hypot(*offset)
    if norm == 0:
        return False
    sizes = (box_a[axis + 2] - box_a[axis]) + (box_b[axis + 2] - box_b[axis])
    reduced = max(abs(offset[axis]) - config.position_slack * sizes, 0.0)
    return sign * offset[axis] > 0 and reduced / norm > config.position_min_cos


def _count_ok(found: int, count: int, exact: bool) -> bool:
    return found == count if exact else found >= count


def evaluate(include: list[dict[str, Any]], detections: list[dict[str, Any]], config: DetectorConfig | None = None) -> dict[str, bool]:
    """Named pass/fail checks of the requests in ``include`` against ``detections``."""
    checks: dict[str, bool] = {}
    matches: list[list[dict[str, Any]]] = []
    for i, req in enumerate(include):
        shape, count, exact, color = req["shape"], int(req.get("count", 1)), bool(req.get("exact", False)), req.get("color")
        if shape not in SHAPES:
            raise ValueError(f"meta include[{i}] asks for unknown shape {shape!r}; expected one of {SHAPES}")
        same_shape = [d for d in detections if d["shape"] == shape]
        checks[f"{i}: {shape} count {'==' if exact else '>='} {count}"] = _count_ok(len(same_shape), count, exact)
        if color is not None:
            colored = [d for d in same_shape if d["color"] == color]
            checks[f"{i}: {color} {shape} count {'==' if exact else '>='} {count}"] = _count_ok(len(colored), count, exact)
            same_shape = colored
        matches.append(same_shape)
    for i, req in enumerate(include):
        if req.get("position"):
            relation, j = req["position"]
            if not 0 <= int(j) < len(include) or int(j) == i:
                raise ValueError(f"meta include[{i}] position refers to include[{j}], which is not another request")
            ok = any(relation_holds(a["box"], b["box"], relation, config) for a in matches[i] for b in matches[int(j)])
            checks[f"{i}: {req['shape']} {relation} {include[int(j)]['shape']}"] = ok
    return checks


def score_image(image: Image.Image | np.ndarray, meta: dict[str, Any], config: DetectorConfig | None = None) -> dict[str, Any]:
    """GenEval-style score of ``image`` against the prompt described by ``meta``.

    Returns {"score": 1.0 | 0.0 | None, "fraction": float | None, "checks": {name: bool},
    "detections": [...]}; score/fraction are None for the "text" skill (scored by OCR).
    """
    if not isinstance(meta, dict) or "include" not in meta:
        raise ValueError("score_image needs the sample's meta dict (with an 'include' list), e.g. WorldSample.meta")
    if meta.get("skill") == "text":
        return {"score": None, "fraction": None, "checks": {}, "detections": []}
    if not meta["include"]:
        raise ValueError(f"meta for skill {meta.get('skill')!r} has an empty 'include' list: nothing to check")
    detections = detect_objects(image, config)
    checks = evaluate(meta["include"], detections, config)
    passed = sum(checks.values())
    return {
        "score": 1.0 if passed == len(checks) else 0.0,
        "fraction": passed / len(checks),
        "checks": checks,
        "detections": detections,
    }
