"""Benchmark loaders (GenEval, DPG-Bench, LongText-Bench), the LongText-Bench OCR metric and the
default OCR engine. Nothing here downloads: benchmarks and models are read from local paths."""
from megatron_xomni.evaluation.benchmarks import (
    BenchmarkPrompt,
    load_benchmark,
    load_dpg_bench,
    load_geneval,
    load_longtext_bench,
)
from megatron_xomni.evaluation.longtext import (
    LongTextReport,
    LongTextResult,
    detect_lang,
    evaluate_image_dir,
    evaluate_images,
    match_counts,
    normalize,
    text_accuracy,
)

__all__ = [
    "BenchmarkPrompt",
    "LongTextReport",
    "LongTextResult",
    "detect_lang",
    "evaluate_image_dir",
    "evaluate_images",
    "load_benchmark",
    "load_dpg_bench",
    "load_geneval",
    "load_longtext_bench",
    "match_counts",
    "normalize",
    "text_accuracy",
]
