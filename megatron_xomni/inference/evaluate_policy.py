"""Evaluate an AR policy on held-out world prompts: rewards, best-of-N and per-skill accuracy.

    python -m megatron_xomni.inference.evaluate_policy --ckpt CKPT --text-tokenizer DIR \
        --image-tokenizer DIR --decoder DIR --out DIR [--per-skill 8] [--samples 16]

For every held-out prompt (the world's evaluation stream, disjoint from training and RL prompts)
it samples N images (X-Omni defaults: T=1, min-p 0.03; per-sample seeds), renders them with the
frozen decoder and reports: mean single-sample reward, best-of-N reward (mean over prompts of the
max), per-skill accuracy (GenEval-style all-or-nothing, over all samples) and a PNG grid of the
first samples. Runs on one rank (torchrun with more ranks also works: each DP rank takes a share).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def evaluate(args) -> dict:
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.evaluation.world_bench import score_world_benchmark, world_benchmark_prompts
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.rewards import RewardEnsemble
    from megatron_xomni.inference.generation import RolloutConfig, generate_images
    from megatron_xomni.inference.render import Renderer
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.data.sequence import SequenceFormat, image_block_ids
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    path = resolve_checkpoint(args.ckpt)
    mcfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
    pg = initialize_parallel(ParallelConfig(), seed=args.seed)
    chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
    load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks), partial=True))
    for c in chunks:
        c.eval()
    text_tok = XOmniTextTokenizer.load(args.text_tokenizer)
    renderer = Renderer(args.image_tokenizer, args.decoder, args.decoder_steps)
    skills = [s for s in args.skills.split(",") if s]
    prompts = world_benchmark_prompts(args.per_skill, height=args.size, width=args.size, skills=skills)
    h = w = args.size // 16
    fmt = SequenceFormat(mcfg.text_vocab_size, mcfg.image_vocab_size)
    header, _, eom = image_block_ids(text_tok, fmt, torch.zeros(h, w, dtype=torch.long).numpy())
    ids = [text_tok.encode(p.caption) + header for p in prompts]
    rcfg = RolloutConfig(sampling=SamplingConfig(temperature=args.temperature, min_p=args.min_p),
                         samples_per_prompt=args.samples, seed=args.seed)
    rollouts = generate_images(chunks, pg, ids, (h, w), eom, rcfg)
    codes = torch.stack([r.codes.view(h, w) for r in rollouts])
    images = []
    for start in range(0, len(rollouts), 64):  # decode in chunks to bound memory
        sl = rollouts[start:start + 64]
        images += renderer(codes[start:start + 64], [args.seed * 7919 + r.sample_id for r in sl],
                           [prompts[r.prompt_id].caption for r in sl])
    grouped = [images[i * args.samples:(i + 1) * args.samples] for i in range(len(prompts))]
    rewards = RewardEnsemble({"world_alignment": 1.0})
    per_prompt = []
    for p, imgs in zip(prompts, grouped):
        r = rewards([p.caption] * len(imgs), imgs, [p.meta] * len(imgs)).total
        per_prompt.append([0.0 if v is None else float(v) for v in r])
    bench = score_world_benchmark(prompts, grouped)
    # The rendering ceiling: the same prompts' ground-truth images through tokenizer -> decoder.
    # No policy can score higher than what the frozen tokenizer + decoder can render.
    from megatron_xomni.training.flux_decoder import pil_to_pixels

    gt_codes = renderer.tokenizer.encode(pil_to_pixels([p.image for p in prompts]))
    recon = renderer(gt_codes, [args.seed * 7919 + i for i in range(len(prompts))], [p.caption for p in prompts])
    ceiling = rewards([p.caption for p in prompts], recon, [p.meta for p in prompts]).total
    out = {
        "checkpoint": str(path), "seed": args.seed, "samples_per_prompt": args.samples,
        "num_prompts": len(prompts), "mean_reward": sum(map(sum, per_prompt)) / sum(map(len, per_prompt)),
        "best_of_n_reward": sum(max(r) for r in per_prompt) / len(per_prompt),
        "ground_truth_codes_reward": sum(0.0 if v is None else v for v in ceiling) / len(prompts),
        "accuracy": bench["overall"], "per_skill": bench["per_skill"], "per_skill_fraction": bench["per_skill_fraction"],
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "eval.json").write_text(json.dumps(out, indent=2))
    _grid(prompts, grouped, outdir / "samples.png", per_row=min(args.samples, 4))
    return out


def _grid(prompts, grouped, path: Path, per_row: int) -> None:
    """One row per prompt (first `per_row` samples), the ground-truth world image first."""
    from PIL import Image

    size = grouped[0][0].size
    canvas = Image.new("RGB", (size[0] * (per_row + 1), size[1] * len(prompts)), "white")
    for i, (p, imgs) in enumerate(zip(prompts, grouped)):
        canvas.paste(p.image.resize(size), (0, i * size[1]))
        for j, im in enumerate(imgs[:per_row]):
            canvas.paste(im, ((j + 1) * size[0], i * size[1]))
    canvas.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--text-tokenizer", required=True)
    p.add_argument("--image-tokenizer", required=True)
    p.add_argument("--decoder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-skill", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--decoder-steps", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--skills", default="single_object,two_objects,counting,colors,position,color_attr")
    args = p.parse_args(argv)
    from megatron_xomni.parallel import destroy_parallel, single_process_env

    single_process_env()

    try:
        out = evaluate(args)
    finally:
        destroy_parallel()
    print(json.dumps({k: v for k, v in out.items() if k != "per_skill_fraction"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
