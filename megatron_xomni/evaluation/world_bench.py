"""The built-in world benchmark: GenEval-style skills scored by the deterministic detector and
the text skill scored by OCR (LongText-style word match), on a fixed held-out prompt set.

    prompts = world_benchmark_prompts(n_per_skill=4)
    images = [[...k images for prompt i...] for i in range(len(prompts))]
    report = score_world_benchmark(prompts, images)
    write_report(report, "out/eval")   # eval.json + eval.md

A GenEval-style image counts as correct only if every requested check passes; the text skill's
accuracy is the mean word-match score (evaluation.longtext, the same metric as the `ocr_text`
reward). Per-skill accuracy averages over prompts and images. Scorers only: rewards are combined
with these scores by the evaluation runner (megatron_xomni.inference.evaluate).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

from megatron_xomni.evaluation.longtext import detect_lang, match_counts, text_accuracy
from megatron_xomni.world import SKILLS, held_out_prompts


def world_benchmark_prompts(n_per_skill: int = 4, seed: int = 12345, height: int = 64, width: int = 64,
                            skills=SKILLS):
    """Fixed held-out prompts, `n_per_skill` for each skill (disjoint seed stream from training)."""
    return held_out_prompts(n_per_skill * len(skills), seed=seed, height=height, width=width, skills=list(skills))


def _text_score(sample, image, ocr: Callable) -> float:
    """LongText-style word-match accuracy of the OCR reading against the prompt's text (0 without text)."""
    gt = sample.meta.get("text")
    if not gt:
        return 0.0
    lang = sample.meta.get("lang") or detect_lang(gt)
    if match_counts(gt, "", lang)[1] == 0:  # nothing countable: skip the (slow) OCR
        return 0.0
    return text_accuracy(gt, ocr(image), lang)


def score_world_benchmark(prompts, images: list[list], ocr: Optional[Callable] = None) -> dict:
    """Per-skill accuracy of `images[i]` (several per prompt) against `prompts[i]`.

    `ocr`: any image -> str callable for the text skill (default: the shared RapidOCR engine)."""
    from megatron_xomni.world.detector import score_image

    per_skill: dict[str, list[float]] = defaultdict(list)
    per_skill_fraction: dict[str, list[float]] = defaultdict(list)
    rows = []
    for sample, imgs in zip(prompts, images):
        skill = sample.meta["skill"]
        for img in imgs:
            if skill == "text":
                if ocr is None:
                    from megatron_xomni.evaluation.ocr import default_ocr

                    ocr = default_ocr()  # cached per process: the model load is the slow part
                s = frac = _text_score(sample, img, ocr)
            else:
                r = score_image(img, sample.meta)
                s, frac = r["score"], r["fraction"]
            per_skill[skill].append(float(s))
            per_skill_fraction[skill].append(float(frac))
            rows.append({"prompt": sample.caption, "skill": skill, "score": float(s), "fraction": float(frac)})
    skills = {k: sum(v) / len(v) for k, v in per_skill.items()}
    return {
        "overall": sum(skills.values()) / max(len(skills), 1),
        "per_skill": skills,
        "per_skill_fraction": {k: sum(v) / len(v) for k, v in per_skill_fraction.items()},
        "num_prompts": len(prompts),
        "images_per_prompt": len(images[0]) if images else 0,
        "rows": rows,
    }


def markdown_table(reports: dict[str, dict]) -> str:
    """One column per named report (e.g. SFT, GRPO), one row per skill."""
    names = list(reports)
    skills = sorted({s for r in reports.values() for s in r["per_skill"]})
    lines = ["| skill | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in skills:
        lines.append(f"| {s} | " + " | ".join(f"{reports[n]['per_skill'].get(s, float('nan')):.3f}" for n in names) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{reports[n]['overall']:.3f}**" for n in names) + " |")
    return "\n".join(lines)


def write_report(report: dict, out_dir, name: str = "eval") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{name}.json", out / f"{name}.md"
    j.write_text(json.dumps(report, indent=2))
    m.write_text(markdown_table({name: report}) + "\n")
    return j, m
