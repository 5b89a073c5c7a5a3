"""The `xomni` command (also `python -m megatron_xomni.cli`).

    xomni generate --bundle B --prompt "a red circle" --size 64x64 --num-images 4 --out out/
    xomni chat --bundle B --image photo.png --question "What is in the image?"
    xomni evaluate --bundle B --benchmark world --per-skill 8 --out eval/   (eval.json: rewards, best-of-N, ceiling)
    xomni corpus --images DIR | --jsonl FILE --out CORPUS   (a WebDataset corpus for the trainers)
    xomni train RECIPE [key=value ...]          (megatron_xomni.train; any stage)
    xomni tokenize RECIPE [key=value ...]       (corpus tokenization: tiny_tokenize, xomni_tokenize)
    xomni submit RECIPE --nodes N [--dry-run] [key=value ...]   (SLURM, any stage)
    xomni convert hf-to-megatron|megatron-to-hf ...   (megatron_xomni.conversion.cli)
    xomni demo [--out DIR] [--smoke]            (the tiny end-to-end pipeline)
    xomni scaling plan|launch|collect|fit|tiny ...   (scaling-law sweeps: megatron_xomni.scaling.cli)

Model parts come from `--bundle DIR` (subfolders model/ text_tokenizer/ image_tokenizer/ decoder/) or from
--model / --text-tokenizer / --image-tokenizer / --decoder (which also override a bundle's parts).
Under torchrun, `--tensor-parallel N --pipeline-parallel M` run the AR model at that layout (the rest
of the world is data parallel); global rank 0 decodes images and writes every file.

Bad input (prompt files, sizes, paths, parts that do not fit together) is reported as one line
`error: ...` on stderr with exit code 2 before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2
DELEGATED = ("train", "tokenize", "convert", "demo", "submit", "scaling")


class UsageError(ValueError):
    """Bad command-line input (reported as one line, exit 2)."""


# ------------------------------------------------------------------------------------------ parsing
def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--size {text!r} is not HxW (e.g. 384x384)")
    return int(m.group(1)), int(m.group(2))


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line (.txt), or JSON objects with a "prompt" field (.jsonl)."""
    from megatron_xomni.file_checks import require_file

    p = require_file(path, "prompts file", "pass a .txt (one prompt per line) or .jsonl file")
    if b"\0" in p.read_bytes()[:1 << 16]:
        raise UsageError(f"prompts file {p} is binary, not UTF-8 text")
    prompts = []
    if p.suffix.lower() == ".jsonl":
        from megatron_xomni.evaluation.benchmarks import read_jsonl

        try:
            rows = read_jsonl(p, '{"prompt": "..."} per line')
        except (ValueError, UnicodeDecodeError) as e:  # UnicodeDecodeError is a ValueError too
            raise UsageError(str(e).splitlines()[0]) from None
        for n, obj in rows:
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise UsageError(f"{p}:{n}: expected an object with a non-empty string \"prompt\" field")
            prompts.append(obj["prompt"].strip())
    else:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"prompts file {p} is not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {p} holds no prompts")
    return prompts


def _add_model_args(p: argparse.ArgumentParser, decoder: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--bundle", help="folder with model/ text_tokenizer/ image_tokenizer/ decoder/")
    g.add_argument("--model", help="megatron_xomni checkpoint root (overrides the bundle's)")
    g.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    g.add_argument("--text-tokenizer", help="text tokenizer folder")
    g.add_argument("--image-tokenizer", help="SigLIP-VQ tokenizer folder")
    if decoder:
        g.add_argument("--decoder", help="diffusion decoder export folder")
    g.add_argument("--tensor-parallel", type=int, default=1, help="TP size (under torchrun)")
    g.add_argument("--pipeline-parallel", type=int, default=1, help="PP size (under torchrun)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")


def _add_sampling_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"sampling ({what})")
    g.add_argument("--temperature", type=float, default=1.0, help="X-Omni default 1.0 (0 = greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--min-p", type=float, default=0.03, help="X-Omni default 0.03")


def _add_image_args(p: argparse.ArgumentParser, size_default: Optional[str], size_help: str) -> None:
    p.add_argument("--size", default=size_default, help=f"HxW in pixels, multiples of 16 (default {size_help})")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default 0)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance of the AR model (1 = off)")
    p.add_argument("--batch-size", type=int, default=4, help="images per generation batch")
    p.add_argument("--decoder-steps", type=int, default=None, help="Euler steps of the decoder (default: its config)")
    p.add_argument("--decoder-guidance", type=float, default=1.0, help="decoder-side CFG scale (1 = off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xomni", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="text -> images (PNG files + generations.jsonl)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help=".txt (one prompt per line) or .jsonl (objects with \"prompt\")")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--out", required=True, help="output folder (must be empty or new, unless --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out: the images listed in its generations.jsonl are deleted first")
    _add_image_args(g, "384x384", "384x384")
    _add_sampling_args(g, "image tokens")
    _add_model_args(g, decoder=True)

    c = sub.add_parser("chat", help="questions about images (greedy unless --sample)")
    c.add_argument("--image", action="append", default=[], required=True, help="an image file (repeatable); images above 64 megapixels are refused "
                   "(raise the cap with $XOMNI_MAX_IMAGE_PIXELS)")
    c.add_argument("--question", action="append", default=[], required=True,
                   help="a question; repeat for a multi-turn conversation (earlier answers stay in context)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--sample", action="store_true", help="sample with the settings below instead of greedy")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--preprocess", default="auto", choices=["auto", "tiny", "xomni"],
                   help="image resizing rules (auto: tiny for the tiny tokenizer, else X-Omni's)")
    c.add_argument("--json", action="store_true", help="print the answers as a JSON list")
    _add_sampling_args(c, "with --sample")
    _add_model_args(c, decoder=False)

    e = sub.add_parser("evaluate", help="generate (and score) a benchmark")
    e.add_argument("--benchmark", required=True, choices=["world", "geneval", "dpg", "longtext"])
    e.add_argument("--prompts", help="published prompt file/folder (geneval, dpg, longtext)")
    e.add_argument("--per-skill", type=int, default=8, help="world: held-out prompts per skill")
    e.add_argument("--images-per-prompt", type=int, default=None,
                   help="default: world 2, geneval/dpg/longtext 4")
    e.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    e.add_argument("--skills", default=None, help="world: comma-separated skills (default: all)")
    e.add_argument("--rewards", default=None,
                   help="rewards scored on every image, NAME=WEIGHT,... (default: world_alignment=1 for world, "
                        "none otherwise; 'none' turns them off)")
    e.add_argument("--decoder-seeds", type=int, default=1,
                   help="world: decode every token sequence K times (K >= 2 adds the decoder-noise floor and "
                        "the honest best-of-N, re-scored with a fresh decoder seed, to eval.json)")
    e.add_argument("--out", required=True, help="output folder")
    _add_image_args(e, None, "64x64 for world, else 1024x1024")
    _add_sampling_args(e, "image tokens")
    _add_model_args(e, decoder=True)

    k = sub.add_parser("corpus", help="build a WebDataset corpus from captioned images (folder or JSONL)",
                       description=_corpus_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, each with a caption in a .txt file of the same stem "
                     "(and optional .json metadata)")
    src.add_argument("--jsonl", help='JSONL of {"image": path, "caption": ...} (other fields become metadata)')
    k.add_argument("--image-root", help="folder relative JSONL image paths start from (default: the JSONL's folder)")
    k.add_argument("--out", required=True, help="corpus folder (must be empty or new, unless --overwrite)")
    k.add_argument("--overwrite", action="store_true", help="replace the corpus in a non-empty --out")
    k.add_argument("--samples-per-shard", type=int, default=1000, help="records per tar shard (default 1000)")
    k.add_argument("--no-recursive", action="store_true", help="--images: only the folder itself, not its subfolders")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

    for name, text in (("train", "train a recipe: xomni train RECIPE [key=value ...]"),
                       ("tokenize", "tokenize a corpus: xomni tokenize tiny_tokenize corpus=DIR save_dir=OUT"),
                       ("convert", "convert checkpoints (HF <-> megatron): xomni convert --help"),
                       ("submit", "submit any recipe to SLURM: xomni submit RECIPE --nodes N [--dry-run] [key=value ...]"),
                       ("demo", "run the tiny end-to-end pipeline: xomni demo [--out DIR] [--smoke]"),
                       ("scaling", "scaling-law sweeps: xomni scaling plan|launch|collect|fit|tiny --help")):
        sub.add_parser(name, help=text, add_help=False)
    return parser


# ------------------------------------------------------------------------------------------ helpers
def _paths(args, decoder: bool):
    from megatron_xomni.inference.bundle import PipelinePaths

    base = None
    if args.bundle:
        base = PipelinePaths.from_bundle(args.bundle, args.iteration, require_decoder=False)
    model = args.model or (base and base.model)
    text = args.text_tokenizer or (base and base.text_tokenizer)
    image = args.image_tokenizer or (base and base.image_tokenizer)
    dec = (getattr(args, "decoder", None) or (base and base.decoder)) if decoder else None
    missing = [flag for flag, v in (("--model", model), ("--text-tokenizer", text), ("--image-tokenizer", image))
               if not v]
    if decoder and not dec:
        missing.append("--decoder")
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: pass --bundle DIR or the part paths")
    return PipelinePaths(model=model, text_tokenizer=text, image_tokenizer=image, decoder=dec, iteration=args.iteration)


def _sampling(args):
    from megatron_xomni.inference.sampling import SamplingConfig

    s = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    s.validate()
    return s


def _layout(args, spec):
    from megatron_xomni.parallel import ParallelConfig

    par = ParallelConfig(tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < par.model_parallel_size:
        raise UsageError(f"--tensor-parallel {par.tensor_parallel} x --pipeline-parallel {par.pipeline_parallel} needs "
                         f"{par.model_parallel_size} ranks but this run has {world}: launch with "
                         f"torchrun --nproc-per-node {par.model_parallel_size} -m megatron_xomni.cli ...")
    par.validate_for(spec.model_config, world, decoding=True)
    return par


def _start(par, seed: int):
    from megatron_xomni.device import announce_missing_extras
    from megatron_xomni.inference.pipeline import init_process_group

    announce_missing_extras()  # input is valid: real work starts, say once what the machine lacks
    return init_process_group(par, seed)


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))


def check_image_file(path: str, preprocess) -> None:
    """Refuse an image that is missing, a folder, empty, not an image, above the pixel cap or outside the
    size rules (all from its header: nothing large is decoded), or broken, naming the file."""
    from megatron_xomni.data.decode import DecodeFailed, decode_pillow, open_image_file
    from megatron_xomni.data.preprocess import target_size

    with open_image_file(path, preprocess.max_pixels) as im:
        try:
            target_size(im.height, im.width, preprocess)
        except ValueError as e:
            raise UsageError(f"image {path}: {e}") from None
    try:
        decode_pillow(Path(path).read_bytes(), max_pixels=preprocess.max_pixels)
    except DecodeFailed as e:
        raise UsageError(f"image {path} cannot be decoded ({e})") from None


GENERATIONS = "generations.jsonl"


def previous_generations(out: Path, overwrite: bool) -> list[Path]:
    """What `generate --out` must delete before writing: nothing for a new or empty folder; with
    --overwrite, the images listed in the previous generations.jsonl and that file; otherwise a
    UsageError (a non-empty folder would end up mixing two runs)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not overwrite:
        raise UsageError(f"--out {out} is not empty: pick a new folder, or pass --overwrite to replace the "
                         f"images listed in its {GENERATIONS}")
    log = out / GENERATIONS
    if not log.is_file():
        return []
    from megatron_xomni.evaluation.benchmarks import read_jsonl

    try:
        rows = read_jsonl(log, 'the {"file": ...} lines xomni generate writes')
    except ValueError as e:
        raise UsageError(f"--overwrite: cannot tell which images {log} lists ({str(e).splitlines()[0]}); "
                         "delete the folder instead") from None
    stale = []
    for n, row in rows:
        name = row.get("file")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UsageError(f"--overwrite: {log}:{n} names {name!r}, not an image file of this folder; "
                             "delete the folder instead")
        stale.append(out / name)
    return stale + [log]


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{name}={value} must be >= {minimum}")


def _generate_all(pipe, jobs: list[tuple[str, int]], h: int, w: int, args, sampling, on_image) -> None:
    """Generate jobs [(prompt, seed)] in batches; rank 0 calls on_image(k, image) for each."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="img", disable=args.no_progress or _rank() != 0, dynamic_ncols=True)
    try:
        for s in range(0, len(jobs), args.batch_size):
            part = jobs[s:s + args.batch_size]
            images = pipe.generate([p for p, _ in part], h, w, [seed for _, seed in part], sampling,
                                   args.cfg_scale, args.decoder_steps, args.decoder_guidance)
            if images is not None:
                for k, img in enumerate(images):
                    on_image(s + k, img)
            bar.update(len(part))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ commands
def cmd_generate(args) -> int:
    from megatron_xomni.inference.bundle import inspect_paths

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    _check_count("--num-images", args.num_images)
    _check_count("--batch-size", args.batch_size)
    height, width = parse_size(args.size)
    out = Path(args.out)
    stale = previous_generations(out, args.overwrite)
    spec = inspect_paths(_paths(args, decoder=True))
    spec.check_generation(prompts, height, width)
    sampling = _sampling(args)
    par = _layout(args, spec)

    from megatron_xomni.inference.pipeline import XOmniPipeline
    from megatron_xomni.parallel import destroy_parallel

    pg = _start(par, args.seed)
    try:
        pipe = XOmniPipeline.from_spec(spec, pg=pg, dtype=args.dtype, max_rows_per_forward=args.batch_size)
        jobs = [(p, args.seed + i * args.num_images + j) for i, p in enumerate(prompts) for j in range(args.num_images)]
        settings = {"height": height, "width": width, "temperature": sampling.temperature, "top_p": sampling.top_p,
                    "top_k": sampling.top_k, "min_p": sampling.min_p, "cfg_scale": args.cfg_scale,
                    "decoder_steps": args.decoder_steps or spec.decoder_config.num_inference_steps,
                    "decoder_guidance": args.decoder_guidance, "checkpoint": str(spec.checkpoint)}
        log = None
        if _rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            for old in stale:  # only now: a run that fails to start leaves the previous results alone
                old.unlink(missing_ok=True)
            log = open(out / GENERATIONS, "w", encoding="utf-8")

        def save(k: int, img) -> None:
            prompt, seed = jobs[k]
            name = f"{k:05d}.png"
            img.save(out / name, format="PNG")
            log.write(json.dumps({"index": k, "prompt": prompt, "seed": seed, "file": name, **settings}) + "\n")
            log.flush()

        try:
            _generate_all(pipe, jobs, height, width, args, sampling, save)
        finally:
            if log is not None:
                log.close()
        if _rank() == 0:
            print(f"wrote {len(jobs)} images and generations.jsonl to {out}", flush=True)
    finally:
        destroy_parallel()
    return 0


def cmd_chat(args) -> int:
    from megatron_xomni.inference.bundle import inspect_paths

    _check_count("--max-new-tokens", args.max_new_tokens)
    if any(not q.strip() for q in args.question):
        raise UsageError("--question must not be empty")
    spec = inspect_paths(_paths(args, decoder=False))
    preprocess = spec.preprocess_config(args.preprocess)
    for path in args.image:
        check_image_file(path, preprocess)
    sampling = _sampling(args) if args.sample else None
    par = _layout(args, spec)

    from megatron_xomni.inference.pipeline import XOmniPipeline
    from megatron_xomni.parallel import destroy_parallel

    pg = _start(par, args.seed)
    try:
        pipe = XOmniPipeline.from_spec(spec, pg=pg, dtype=args.dtype, preprocess=args.preprocess, load_decoder=False)
        answers = pipe.chat_turns(args.image, args.question, args.max_new_tokens, sampling, args.seed)
        if _rank() == 0:
            if args.json:
                print(json.dumps(answers, ensure_ascii=False), flush=True)
            else:
                for answer in answers:
                    print(answer, flush=True)
    finally:
        destroy_parallel()
    return 0


def cmd_evaluate(args) -> int:
    from megatron_xomni.inference import evaluate as ev
    from megatron_xomni.inference.bundle import inspect_paths

    height, width = parse_size(args.size or ("64x64" if args.benchmark == "world" else "1024x1024"))
    n_img = args.images_per_prompt or ev.DEFAULT_IMAGES[args.benchmark]
    _check_count("--images-per-prompt", n_img)
    _check_count("--batch-size", args.batch_size)
    _check_count("--decoder-seeds", args.decoder_seeds)
    if args.decoder_seeds > 1 and args.benchmark != "world":
        raise UsageError("--decoder-seeds applies to --benchmark world only: drop it")
    rewards = ev.parse_rewards(args.rewards, args.benchmark)
    skills = ev.parse_skills(args.skills)
    spec = inspect_paths(_paths(args, decoder=True))
    spec.grid(height, width)
    prompts = ev.load_prompts(args.benchmark, args.prompts, args.per_skill, height, width, args.limit, skills)
    texts = [ev.prompt_text(args.benchmark, p) for p in prompts]
    spec.check_generation(texts, height, width)
    sampling = _sampling(args)
    par = _layout(args, spec)
    job = ev.EvalJob(args.benchmark, prompts, n_img, height, width, args.seed, rewards, str(spec.checkpoint),
                     args.decoder_seeds)

    from megatron_xomni.inference.pipeline import XOmniPipeline
    from megatron_xomni.parallel import destroy_parallel

    pg = _start(par, args.seed)
    try:
        pipe = XOmniPipeline.from_spec(spec, pg=pg, dtype=args.dtype, max_rows_per_forward=args.batch_size)
        redecodes = None
        if args.benchmark == "world":  # codes sampled once, decoded --decoder-seeds times
            decodes = ev.generate_world_images(pipe, job, sampling, args.cfg_scale, args.decoder_steps,
                                               args.decoder_guidance, args.batch_size, not args.no_progress)
            images, redecodes = (decodes[0], decodes[1:]) if decodes is not None else (None, None)
        else:
            jobs = [(t, seed) for t, seeds in zip(texts, ev.image_seeds(job)) for seed in seeds]
            images = [[] for _ in prompts]

            def keep(k: int, img) -> None:
                images[k // n_img].append(img)

            _generate_all(pipe, jobs, height, width, args, sampling, keep)
        if _rank() == 0:
            ceiling = ev.render_ground_truth(pipe.renderer, job, args.decoder_steps, args.decoder_guidance) \
                if args.benchmark == "world" and rewards else None
            summary = ev.write_outputs(job, images, Path(args.out), ground_truth=ceiling, redecodes=redecodes)
            headline = {k: summary[k] for k in ("overall", "accuracy") if k in summary}
            print(json.dumps({"benchmark": args.benchmark, "out": args.out, **headline}), flush=True)
    finally:
        destroy_parallel()
    return 0


def _corpus_doc() -> str:
    from megatron_xomni.data import corpus_build

    return corpus_build.__doc__


def cmd_corpus(args) -> int:
    from megatron_xomni.data.corpus_build import build_corpus, summary

    manifest = build_corpus(args.out, images=args.images, jsonl=args.jsonl, image_root=args.image_root,
                            overwrite=args.overwrite, recursive=not args.no_recursive,
                            samples_per_shard=args.samples_per_shard, progress=not args.no_progress)
    print(summary(manifest, args.out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------ delegation
def _train(argv: list[str]) -> int:
    from megatron_xomni.train import main as train_main

    return train_main(argv)


def _tokenize(argv: list[str]) -> int:
    """`xomni tokenize RECIPE k=v`: `xomni train` restricted to the tokenization stage's recipes."""
    from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig
    from megatron_xomni.recipes import available_recipes, load_recipe

    names = [n for n in available_recipes() if isinstance(load_recipe(n), TokenizeRunConfig)]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: xomni tokenize RECIPE [key=value ...]   (recipes: " + ", ".join(names) + ")\n\n"
              + (TokenizeRunConfig.__doc__ or ""))
        return 0 if argv else EXIT_USAGE
    if argv[0] not in names:
        raise UsageError(f"{argv[0]!r} is not a tokenization recipe: choose one of {', '.join(names)} "
                         "(other stages: xomni train RECIPE)")
    return _train(argv)


def _convert(argv: list[str]) -> int:
    from megatron_xomni.conversion.cli import main as convert_main

    return convert_main(argv)


def _submit(argv: list[str]) -> int:
    from megatron_xomni.slurm.submit import main as submit_main

    return submit_main(argv)


def _demo(argv: list[str]) -> int:
    from megatron_xomni.demo.cli import main as demo_main

    return demo_main(argv)


def _scaling(argv: list[str]) -> int:
    from megatron_xomni.scaling.cli import main as scaling_main

    return scaling_main(argv)


# ------------------------------------------------------------------------------------------ entry
def _error(msg: str) -> int:
    if _rank() == 0 or os.environ.get("RANK") is None:
        print("error: " + " ".join(str(msg).split("\n")).strip(), file=sys.stderr, flush=True)
    return EXIT_USAGE


def _quiet_library_warnings() -> None:
    """torch warns about its own deprecated checkpoint APIs that megatron-core calls; that is not actionable for
    a user of this command, and it would bury the one-line errors. (megatron-core's Transformer Engine / Apex
    warnings are filtered by megatron_xomni.device and replaced by one notice.)"""
    import warnings

    from megatron_xomni.device import quiet_missing_extras

    quiet_missing_extras()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron_xomni\.cpu_compat")
    warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_warnings()
    if argv and argv[0] in DELEGATED:
        try:
            return {"train": _train, "tokenize": _tokenize, "convert": _convert, "demo": _demo,
                    "submit": _submit, "scaling": _scaling}[argv[0]](argv[1:]) or 0
        except UsageError as e:
            return _error(str(e))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    commands = {"generate": cmd_generate, "chat": cmd_chat, "evaluate": cmd_evaluate, "corpus": cmd_corpus}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # UsageError, LayoutError, FormatError are ValueErrors
        return _error(str(e))


if __name__ == "__main__":
    sys.exit(main())
