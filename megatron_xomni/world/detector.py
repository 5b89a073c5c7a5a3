"""Deterministic GenEval-style detector and scorer for world images.

``score_image(image, meta)`` checks that an image shows what the prompt in ``meta`` asked
for.  It works on pixels only (``meta["include"]`` supplies the request, never the answer),
so it can score images produced by a model.

Detection, in plain image processing (OpenCV + numpy, no learned weights):
1. background colour = per-channel median of the 1-pixel image border;
2. foreground = pixels whose RGB distance to the background exceeds ``fg_threshold``;
   this is half-way or less towards every palette colour, so blur keeps blobs near their
   true outline and noise of a few tens of levels does not create blobs;
3. 8-connected components; blobs smaller than ``min_area_frac`` x short_side^2 are ignored;
4. shape = the world shape whose template (drawn into the blob's bounding box) has the
   highest IoU with the blob, or "unknown" below ``min_shape_iou``.  Fitting the template to
   the blob's own box makes the test scale-free and tolerant of blur shrinking/growing it;
5. colour = nearest palette colour to the mean of the blob's most saturated half (the
   pixels farthest from the background, i.e. away from blurred edges), or None if farther
   than ``color_max_dist`` from every palette colour.

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

from megatron_xomni.world.render import shape_mask
from megatron_xomni.world.vocab import PALETTE, SHAPES

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)
_RELATION_AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector; defaults are tuned for the world palette."""

    fg_threshold: float = 90.0  # RGB distance from the background above which a pixel is foreground
    min_area_frac: float = 0.01  # ignore blobs smaller than this fraction of short_side^2
    min_shape_iou: float = 0.6  # below this best template IoU the blob's shape is "unknown"
    color_max_dist: float = 110.0  # farther than this from every palette colour -> colour None
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


def _classify_shape(blob: np.ndarray) -> tuple[str, float]:
    """Best-matching world shape for a boolean blob cropped to its bounding box."""
    h, w = blob.shape
    best, best_iou = "unknown", 0.0
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        union = np.logical_or(blob, template).sum()
        iou = float(np.logical_and(blob, template).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def detect_objects(image: Image.Image | np.ndarray, config: DetectorConfig | None = None) -> list[dict[str, Any]]:
    """Blobs in ``image`` as dicts {shape, color, box [x0,y0,x1,y1) , area, iou}."""
    config = config or DetectorConfig()
    arr = _to_array(image)
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
        pixels = arr[y : y + h, x : x + w][blob]
        strength = dist_bg[y : y + h, x : x + w][blob]
        # Colour from the blob's strongest half: away from edges that blur mixed with background.
        core = pixels[strength >= np.median(strength)].mean(axis=0)
        dists = np.linalg.norm(_PALETTE_RGB - core, axis=1)
        nearest = int(np.argmin(dists))
        color = _PALETTE_NAMES[nearest] if dists[nearest] <= config.color_max_dist else None
        # Outline = the half-way level between background and the blob's own colour.  For a
        # blurred straight edge that level stays on the true edge, whereas the global
        # foreground threshold (nearer the background) bulges every blurred shape outwards
        # towards a disc.  Only this blob's pixels may take part, so neighbours never merge.
        direction = core - bg
        alpha = ((arr[y : y + h, x : x + w] - bg) @ direction) / max(float(direction @ direction), 1e-6)
        outline = blob & (alpha >= 0.5)
        if not outline.any():
            continue
        ys, xs = np.nonzero(outline)
        outline = outline[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        box = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
        shape, iou = _classify_shape(outline)
        if iou < config.min_shape_iou:
            shape = "unknown"
        detections.append({"shape": shape, "color": color, "box": box, "area": int(outline.sum()), "iou": round(iou, 4)})
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
