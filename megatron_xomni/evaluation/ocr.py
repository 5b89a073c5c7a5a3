"""The default OCR engine: RapidOCR (PaddleOCR's PP-OCR det/rec models run by onnxruntime on CPU).

The rapidocr wheel ships its default ONNX models in ``rapidocr/models``; we pass their paths
explicitly so the engine never reaches for its download fallback (rapidocr downloads a model
when ``model_path`` is unset and the file is missing). Any callable ``image -> str`` can stand in
for this engine wherever an ``ocr`` argument is taken (GOT-OCR, a VLM, a test double).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class RapidOCRConfig:
    """Settings for :class:`RapidOCREngine`; model paths default to the models bundled in the wheel."""

    # ONNX text-detection model; None -> the bundled ``*det*.onnx``.
    det_model_path: str | None = None
    # ONNX text-recognition model (its character dictionary is embedded); None -> bundled ``*rec*.onnx``.
    rec_model_path: str | None = None
    # ONNX text-angle classifier; None -> bundled ``*cls*.onnx``. Used only when use_cls is True.
    cls_model_path: str | None = None
    # Run the 180-degree angle classifier; generated images are upright, so off saves time.
    use_cls: bool = False
    # Recognised lines scoring below this confidence are dropped (rapidocr's default 0.5).
    text_score: float = 0.5
    # Detector input sizing: "max" caps the long side at det_limit_side_len (never upscales);
    # rapidocr's default ("min", 736) upscales the *short* side to 736, which turns a 384x96
    # crop into 2944x736 and costs ~20x the time for no accuracy gain on rendered text.
    det_limit_type: str = "max"
    # Side length the detector limit applies to (PaddleOCR's classic default 960).
    det_limit_side_len: int = 960
    # onnxruntime intra-op threads; -1 lets onnxruntime choose.
    num_threads: int = -1


def _bundled_model(kind: str) -> str:
    import rapidocr

    models_dir = Path(rapidocr.__file__).parent / "models"
    found = sorted(models_dir.glob(f"*{kind}*.onnx"))
    if len(found) != 1:
        raise ValueError(
            f"expected one bundled rapidocr {kind} model in {models_dir}, found {len(found)}; "
            f"pass RapidOCRConfig({kind}_model_path=...) explicitly"
        )
    return str(found[0])


class RapidOCREngine:
    """Callable ``image -> text``: recognised lines joined by newlines (empty string if none)."""

    def __init__(self, config: RapidOCRConfig | None = None) -> None:
        from rapidocr import RapidOCR

        cfg = config or RapidOCRConfig()
        if cfg.det_limit_type not in ("max", "min"):
            raise ValueError(f"det_limit_type must be 'max' or 'min', got {cfg.det_limit_type!r}")
        paths = {}
        for kind in ("det", "rec", "cls"):
            path = getattr(cfg, f"{kind}_model_path") or _bundled_model(kind)
            if not Path(path).is_file():
                raise ValueError(f"rapidocr {kind} model {path} does not exist; fix {kind}_model_path")
            paths[kind] = path
        self.config = cfg
        self._engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": cfg.use_cls,
                "Global.text_score": cfg.text_score,
                "Det.model_path": paths["det"],
                "Det.limit_type": cfg.det_limit_type,
                "Det.limit_side_len": cfg.det_limit_side_len,
                "Rec.model_path": paths["rec"],
                "Cls.model_path": paths["cls"],
                "EngineConfig.onnxruntime.intra_op_num_threads": cfg.num_threads,
            }
        )

    def __call__(self, image: Image.Image) -> str:
        # rapidocr converts PIL images to the BGR order its models expect itself.
        result = self._engine(image.convert("RGB"))
        txts = getattr(result, "txts", None)
        return "\n".join(txts) if txts else ""


@functools.lru_cache(maxsize=1)
def default_ocr() -> RapidOCREngine:
    """The process-wide RapidOCR engine with default settings, created on first use."""
    return RapidOCREngine()
