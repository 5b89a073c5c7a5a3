"""The evaluation runner: generate images for a benchmark's prompts, write them the way its scorer
expects, and combine the scorers (megatron_xomni.evaluation) with rewards (megatron_xomni.rewards).

- world:    the built-in world benchmark (megatron_xomni.evaluation.world_bench), scored here:
            `<out>/world.json` + `<out>/world.md`, images in `<out>/images/{i:04d}_{j}.png`, and the
            policy report `<out>/eval.json`: mean single-sample reward, best-of-N reward (mean over
            prompts of the max over its images), the rendering ceiling `ground_truth_codes_reward`
            (the prompts' ground-truth images through the frozen tokenizer + decoder), per-skill
            accuracy; `<out>/samples.png`: one row per prompt, the ground-truth image first.
- geneval:  GenEval's layout for its external scorer: `<out>/<00000>/metadata.jsonl` (the prompt's
            metadata line) + `<out>/<00000>/samples/<j:05d>.png`.
- dpg:      DPG-Bench's layout: `<out>/<item_id>.png`, the images of one prompt tiled in a grid
            (2x2 for 4 images; pass the same count as `--pic-num` to its compute script).
- longtext: LongText-Bench's layout `<out>/images[/<lang>]/<prompt_id>_<j>.png`, scored here with the
            LongText metric (rapidocr): `<out>/longtext.json` + `<out>/longtext.md`.

Image j of prompt i uses seed `seed + i * images_per_prompt + j`, so any single image can be
regenerated with `xomni generate --seed ...`. World only, `decoder_seeds` = K >= 2 decodes every token
sequence K times (decode 0 is the image above; decode k >= 1 of every sample of prompt i uses the one
decoder seed `seed + P * N + P * k + i`, P prompts x N images - after the ceiling seeds, disjoint from
every other seed - so decodes 1.. are common random numbers within a prompt, as GRPO decodes) and adds the
diagnostics of megatron_xomni.evaluation.diagnostics to eval.json: the noise floor (decoder-seed
share of the reward variance), the honest best-of-N (picked on decode 0, re-scored by the mean of
decodes 1..K-1) and
per-skill all-or-nothing accuracy next to partial credit. `--rewards NAME=WEIGHT,...` (default: world_alignment
for world, none otherwise) adds the reward statistics to summary.json (and eval.json); a reward that
does not apply to an image (None) counts as 0, as in GRPO.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

BENCHMARKS = ("world", "geneval", "dpg", "longtext")
DEFAULT_IMAGES = {"world": 2, "geneval": 4, "dpg": 4, "longtext": 4}
DEFAULT_REWARDS = {"world": {"world_alignment": 1.0}}
# Ids from a prompt file become file names under --out: one plain name each (no separators, no leading
# dot), so that `../..`, an absolute path or a hidden name cannot write outside --out.
_PLAIN_NAME = re.compile(r"\w[\w.\-]*")


@dataclass
class EvalJob:
    """What to generate for one benchmark run."""

    benchmark: str
    """One of BENCHMARKS."""
    prompts: list
    """WorldSample list (world) or BenchmarkPrompt list (published benchmarks)."""
    images_per_prompt: int
    """Images generated per prompt."""
    height: int
    """Image height in pixels."""
    width: int
    """Image width in pixels."""
    seed: int = 0
    """Base seed (see the module docstring)."""
    rewards: Optional[dict] = None
    """Reward weights {name: weight} scored on every image (None: no reward statistics)."""
    checkpoint: Optional[str] = None
    """The evaluated checkpoint (recorded in the reports)."""
    decoder_seeds: int = 1
    """World only: decodes per token sequence (K >= 2 adds the noise floor and the honest best-of-N)."""


def parse_rewards(text: Optional[str], benchmark: str) -> Optional[dict]:
    """"name=weight,name=weight" (or "none") -> {name: weight}; None / "" -> the benchmark's default.
    ValueError (one line) for an unknown name or a weight that is not a positive number."""
    from megatron_xomni.rewards import available_rewards

    if text is None or not text.strip():
        default = DEFAULT_REWARDS.get(benchmark)
        return dict(default) if default else None
    if text.strip().lower() == "none":
        return None
    out = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        name = name.strip()
        if name not in available_rewards():
            raise ValueError(f"--rewards: unknown reward {name!r}: choose from {', '.join(available_rewards())}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight {weight!r} of {name} is not a number (use name=1.0)") from None
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"--rewards: weight {weight!r} of {name} must be a positive number")
        out[name] = w
    return out


def parse_skills(text: Optional[str]) -> Optional[list[str]]:
    """"a,b" -> ["a", "b"] (world skills; None / "" -> all); ValueError naming an unknown skill."""
    from megatron_xomni.evaluation.world_bench import SKILLS

    if text is None or not text.strip():
        return None
    skills = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in skills if s not in SKILLS]
    if bad:
        raise ValueError(f"--skills: unknown world skill {bad[0]!r}: choose from {', '.join(SKILLS)}")
    return skills


def load_prompts(benchmark: str, path: Optional[str], per_skill: int, height: int, width: int,
                 limit: Optional[int] = None, skills: Optional[list[str]] = None) -> list:
    """The benchmark's prompts (ValueError / FileNotFoundError with one line when they cannot be read)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
    if skills is not None and benchmark != "world":
        raise ValueError(f"--skills selects world skills: drop it for --benchmark {benchmark}")
    if benchmark == "world":
        from megatron_xomni.evaluation.world_bench import SKILLS, world_benchmark_prompts

        if per_skill < 1:
            raise ValueError(f"--per-skill={per_skill} must be >= 1")
        prompts = world_benchmark_prompts(n_per_skill=per_skill, height=height, width=width,
                                          skills=skills or SKILLS)
    else:
        from megatron_xomni.evaluation.benchmarks import load_benchmark

        if not path:
            raise ValueError(f"--benchmark {benchmark} needs --prompts PATH (the published prompt file or folder)")
        name = {"dpg": "dpg_bench", "longtext": "longtext_bench"}.get(benchmark, benchmark)
        prompts = load_benchmark(name, path)
    if limit is not None:
        prompts = prompts[: max(0, int(limit))]
    if not prompts:
        raise ValueError(f"no {benchmark} prompts to evaluate")
    output_stems(benchmark, prompts, where=path)
    return prompts


def _file_stem(p, benchmark: str) -> str:
    """The part of the output file name that comes from the prompt file (dpg: item_id; longtext: prompt_id)."""
    return p.id if benchmark == "dpg" else p.meta.get("prompt_id", p.id)


def output_stems(benchmark: str, prompts: list, where=None) -> list[Optional[str]]:
    """Per prompt, the id that names its output files (None where the name is our own index). ValueError
    (one line) when an id is not a plain file name or two prompts would write the same files."""
    if benchmark not in ("dpg", "longtext"):
        return [None] * len(prompts)
    seen: dict[tuple, str] = {}
    stems = []
    src = f"{where}: " if where else ""
    for p in prompts:
        stem = _file_stem(p, benchmark)
        field = "item_id" if benchmark == "dpg" else "prompt_id"
        if not isinstance(stem, str) or not _PLAIN_NAME.fullmatch(stem):
            raise ValueError(f"{src}{field} {stem!r} is not a plain file name (letters, digits, '_', '-', '.'; "
                             "no '/' and no leading '.'): it names an output file under --out; fix the prompt file")
        key = (p.meta.get("lang", "en") if benchmark == "longtext" else "", stem)
        if key in seen:
            raise ValueError(f"{src}two prompts have {field} {stem!r}: their images would overwrite each other; "
                             "make the ids unique")
        seen[key] = stem
        stems.append(stem)
    return stems


def prompt_text(benchmark: str, p) -> str:
    return p.caption if benchmark == "world" else p.prompt


def grid_image(images: list[Image.Image]) -> Image.Image:
    """Tile images row-major into a near-square grid (2x2 for 4)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    canvas = Image.new("RGB", (cols * w, rows * h))
    for n, im in enumerate(images):
        canvas.paste(im, ((n % cols) * w, (n // cols) * h))
    return canvas


def _save(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return str(path)


def image_seeds(job: EvalJob) -> list[list[int]]:
    """seeds[i][j]: the seed of image j of prompt i (see the module docstring)."""
    n = job.images_per_prompt
    return [[job.seed + i * n + j for j in range(n)] for i in range(len(job.prompts))]


def decode_seeds(job: EvalJob, k: int) -> list[list[int]]:
    """seeds[i][j] of decode k of image j of prompt i (k = 0: the image seed; k >= 1: one seed per
    prompt and decode; see the module docstring)."""
    if k == 0:
        return image_seeds(job)
    p, n = len(job.prompts), job.images_per_prompt
    return [[job.seed + p * n + p * k + i] * n for i in range(p)]


def generate_world_images(pipe, job: EvalJob, sampling, cfg_scale: float, decoder_steps: Optional[int],
                          decoder_guidance: float, batch_size: int, progress: bool = False):
    """images[k][i][j]: decode k of sample j of prompt i (rank 0; None elsewhere). The token sequences
    are sampled once (seeded by the image seed) and decoded job.decoder_seeds times."""
    from tqdm import tqdm

    texts = [prompt_text(job.benchmark, p) for p in job.prompts]
    n, k_all = job.images_per_prompt, job.decoder_seeds
    flat = [(i, j) for i in range(len(texts)) for j in range(n)]
    seeds = [decode_seeds(job, k) for k in range(k_all)]
    out = [[[] for _ in texts] for _ in range(k_all)] if pipe.is_output_rank else None
    bar = tqdm(total=len(flat), unit="img", disable=not progress or not pipe.is_output_rank, dynamic_ncols=True)
    try:
        for s in range(0, len(flat), batch_size):
            part = flat[s:s + batch_size]
            codes = pipe.generate_codes([texts[i] for i, _ in part], job.height, job.width,
                                        [seeds[0][i][j] for i, j in part], sampling, cfg_scale)
            if out is not None:
                for k in range(k_all):
                    images = pipe.decode_codes(codes, [texts[i] for i, _ in part], [seeds[k][i][j] for i, j in part],
                                               decoder_steps, decoder_guidance)
                    for (i, _), im in zip(part, images):
                        out[k][i].append(im)
            bar.update(len(part))
    finally:
        bar.close()
    return out


def ceiling_seeds(job: EvalJob) -> list[int]:
    """Decoder seeds of the ground-truth renders: after every generated image's seed."""
    first = job.seed + len(job.prompts) * job.images_per_prompt
    return [first + i for i in range(len(job.prompts))]


def render_ground_truth(renderer, job: EvalJob, steps: Optional[int] = None,
                        guidance: float = 1.0) -> list[Image.Image]:
    """World only: each prompt's ground-truth image -> frozen tokenizer codes -> decoder. No policy can
    score higher than what the tokenizer + decoder render from the true codes (the rendering ceiling)."""
    import torch

    from megatron_xomni.inference.render import pil_to_pixels

    device = next(renderer.tokenizer.parameters()).device
    out: list[Image.Image] = []
    seeds, texts = ceiling_seeds(job), [prompt_text(job.benchmark, p) for p in job.prompts]
    for s in range(0, len(job.prompts), renderer.batch_size):
        part = job.prompts[s:s + renderer.batch_size]
        with torch.no_grad():
            codes = renderer.tokenizer.encode(pil_to_pixels([p.image for p in part]).to(device))
        out += renderer(codes, seeds[s:s + len(part)], texts[s:s + len(part)], steps=steps, guidance=guidance)
    return out


def reward_table(job: EvalJob, images: list[list[Image.Image]], ensemble=None) -> list[list[float]]:
    """rewards[i][j] of image j of prompt i (a reward that does not apply counts 0)."""
    from megatron_xomni.rewards import RewardEnsemble

    ensemble = ensemble or RewardEnsemble(dict(job.rewards))
    texts = [prompt_text(job.benchmark, p) for p in job.prompts]
    out = []
    for t, p, imgs in zip(texts, job.prompts, images):
        total = ensemble([t] * len(imgs), imgs, [p.meta] * len(imgs)).total
        out.append([0.0 if v is None else float(v) for v in total])
    return out


def reward_report(job: EvalJob, images: list[list[Image.Image]],
                  ground_truth: Optional[list[Image.Image]] = None,
                  redecodes: Optional[list[list[list[Image.Image]]]] = None) -> dict:
    """Mean single-sample reward, best-of-N reward and (given the ground-truth renders) the ceiling.

    `redecodes`: decodes 1..K-1 of the same token sequences (evaluation.diagnostics): adds the noise
    floor, the honest best-of-N and mean_reward_all_decodes (over every decode: a lower-variance
    estimate of the same mean)."""
    from megatron_xomni.evaluation.diagnostics import best_of_n, noise_floor
    from megatron_xomni.rewards import RewardEnsemble

    ensemble = RewardEnsemble(dict(job.rewards))
    texts = [prompt_text(job.benchmark, p) for p in job.prompts]
    per_prompt = reward_table(job, images, ensemble)
    out = {"rewards": dict(job.rewards),
           "mean_reward": sum(map(sum, per_prompt)) / sum(map(len, per_prompt)),
           "best_of_n_reward": sum(max(r) for r in per_prompt) / len(per_prompt)}
    if redecodes:
        tables = [per_prompt] + [reward_table(job, imgs, ensemble) for imgs in redecodes]
        cube = [[[t[i][j] for t in tables] for j in range(len(per_prompt[i]))] for i in range(len(per_prompt))]
        out["decoder_seeds"] = len(tables)
        out["noise_floor"] = noise_floor(cube, shared_from=1)  # decodes 1.. share a seed per prompt
        out["mean_reward_all_decodes"] = out["noise_floor"]["mean_reward"]
        # picked on decode 0, scored by the mean of the fresh decodes 1..K-1 (less seed luck per prompt)
        fresh = [[sum(t[i][j] for t in tables[1:]) / (len(tables) - 1) for j in range(len(per_prompt[i]))]
                 for i in range(len(per_prompt))]
        out["honest_best_of_n_reward"] = best_of_n(tables[0], fresh)["honest"]
        out["decode_rewards"] = tables  # [decode][prompt][sample]: the table the figures come from
    if ground_truth is not None:
        total = [0.0 if v is None else float(v) for v in ensemble(texts, ground_truth, [p.meta for p in job.prompts]).total]
        out["ground_truth_codes_reward"] = sum(total) / len(texts)
        by_skill: dict = {}
        for p, v in zip(job.prompts, total):
            by_skill.setdefault(p.meta.get("skill", "all"), []).append(v)
        out["ground_truth_codes_reward_per_skill"] = {k: sum(v) / len(v) for k, v in sorted(by_skill.items())}
    return out


def samples_grid(prompts, images: list[list[Image.Image]], per_row: int) -> Image.Image:
    """One row per prompt: the ground-truth world image, then its first `per_row` samples."""
    size = images[0][0].size
    canvas = Image.new("RGB", (size[0] * (per_row + 1), size[1] * len(prompts)), "white")
    for i, (p, imgs) in enumerate(zip(prompts, images)):
        canvas.paste(p.image.resize(size), (0, i * size[1]))
        for j, im in enumerate(imgs[:per_row]):
            canvas.paste(im, ((j + 1) * size[0], i * size[1]))
    return canvas


def write_outputs(job: EvalJob, images: list[list[Image.Image]], out: Path,
                  ocr: Optional[Callable] = None, ground_truth: Optional[list[Image.Image]] = None,
                  redecodes: Optional[list[list[list[Image.Image]]]] = None) -> dict:
    """Write images (and, for world/longtext, the scores) for `images[i]` = the images of prompt i.
    `ground_truth`: world only, the renders of `render_ground_truth` (adds the ceiling to eval.json);
    `redecodes`: world only, decodes 1..K-1 of the same sequences (adds the diagnostics)."""
    out.mkdir(parents=True, exist_ok=True)
    b = job.benchmark
    summary: dict = {"benchmark": b, "num_prompts": len(job.prompts), "images_per_prompt": job.images_per_prompt,
                     "height": job.height, "width": job.width, "seed": job.seed}
    if job.checkpoint is not None:
        summary["checkpoint"] = job.checkpoint
    rewards = reward_report(job, images, ground_truth if b == "world" else None,
                            redecodes if b == "world" else None) if job.rewards else {}
    summary.update(rewards)
    if b == "world":
        from megatron_xomni.evaluation.world_bench import score_world_benchmark, write_report

        for i, imgs in enumerate(images):
            for j, im in enumerate(imgs):
                _save(im, out / "images" / f"{i:04d}_{j}.png")
        from megatron_xomni.evaluation.diagnostics import per_skill_metrics

        report = score_world_benchmark(job.prompts, images, ocr=ocr)
        skills = per_skill_metrics(report["rows"])  # all-or-nothing accuracy and partial credit, per skill
        j_path, m_path = write_report(report, out, name="world")
        summary.update(overall=report["overall"], per_skill=report["per_skill"], report=str(j_path),
                       table=str(m_path))
        policy = {"checkpoint": job.checkpoint, "seed": job.seed, "samples_per_prompt": job.images_per_prompt,
                  "num_prompts": len(job.prompts), **rewards, "accuracy": report["overall"],
                  "per_skill": report["per_skill"], "per_skill_fraction": report["per_skill_fraction"],
                  "per_skill_metrics": skills}
        (out / "eval.json").write_text(json.dumps(policy, indent=2))
        samples_grid(job.prompts, images, per_row=min(job.images_per_prompt, 4)).save(out / "samples.png")
    elif b == "geneval":
        for p, imgs in zip(job.prompts, images):
            folder = out / p.id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps({**p.meta, "prompt": p.prompt}) + "\n")
            for j, im in enumerate(imgs):
                _save(im, folder / "samples" / f"{j:05d}.png")
        summary["layout"] = "geneval: <out>/<index>/metadata.jsonl + samples/*.png"
    elif b == "dpg":
        for p, imgs, stem in zip(job.prompts, images, output_stems(b, job.prompts)):
            _save(grid_image(imgs), out / f"{stem}.png")
        summary["layout"] = f"dpg_bench: <out>/<item_id>.png ({len(images[0])} images per grid)"
    else:  # longtext
        from megatron_xomni.evaluation.longtext import LongTextReport, evaluate_image_dir

        output_stems(b, job.prompts)  # every prompt_id is a plain, unique name
        langs = sorted({p.meta.get("lang", "en") for p in job.prompts})
        report = LongTextReport()
        for lang in langs:
            sub = out / "images" / lang if len(langs) > 1 else out / "images"
            mine = [(p, imgs) for p, imgs in zip(job.prompts, images) if p.meta.get("lang", "en") == lang]
            for p, imgs in mine:
                for j, im in enumerate(imgs):
                    _save(im, sub / f"{p.meta.get('prompt_id', p.id)}_{j}.png")
            report.results += evaluate_image_dir([p for p, _ in mine], sub, ocr=ocr).results
        data = {"accuracy": report.accuracy, "mean_accuracy": report.mean_accuracy, "by_lang": report.by_lang(),
                "results": [r.__dict__ | {"accuracy": r.accuracy} for r in report.results]}
        (out / "longtext.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
        lines = ["| language | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in data["by_lang"].items()]
        lines.append(f"| **overall** | **{report.accuracy:.3f}** |")
        (out / "longtext.md").write_text("\n".join(lines) + "\n")
        summary.update(accuracy=report.accuracy, by_lang=data["by_lang"], report=str(out / "longtext.json"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
