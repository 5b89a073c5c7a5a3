"""Train the SigLIP-VQ tokenizer LLaVA-style against a frozen text LLM (X-Omni section 1).

  # one process
  python -m megatron_xomni.training.siglip_vq_cli --corpus CORPUS --out OUT --steps 1000 --batch-size 16 --llm-warmup-steps 300
  # K data-parallel ranks (gloo on CPU): the global batch is split over them
  torchrun --nproc-per-node K -m megatron_xomni.training.siglip_vq_cli --corpus CORPUS --out OUT --steps 1000 --batch-size 16

CORPUS is a WebDataset corpus (megatron_xomni.data; e.g. `write_world_corpus` for the built-in world).
The frozen LLM is the tiny preset (or --llm-preset), randomly initialised unless --llm-checkpoint
loads a trained one; a random LLM is a weak teacher, so --llm-warmup-steps N first trains it as a
text-only LM on the corpus' captions + QA for N steps and then freezes it (saved to OUT/teacher).

Writes OUT/tokenizer (SiglipVQTokenizer.save_pretrained), OUT/projector.safetensors, OUT/teacher,
OUT/text_tokenizer (when none is given), OUT/checkpoints/step_N (resumable: rerun the same command to
continue) and OUT/tb (TensorBoard: caption loss, VQ loss, codebook usage and perplexity).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _single_process_env() -> None:
    """Without torchrun, run as a world of one (megatron-core needs a process group)."""
    from megatron_xomni.parallel import single_process_env

    single_process_env()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="WebDataset corpus directory")
    p.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (images per step over all ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tokenizer-preset", default="tiny", help="tokenizer_config preset: tiny | xomni")
    p.add_argument("--tokenizer-override", action="append", default=[], metavar="FIELD=JSON",
                   help="SigLIPVQConfig field override, e.g. skip_quant_prob=0.0 (repeatable)")
    p.add_argument("--init-tokenizer", help="start from a save_pretrained folder")
    p.add_argument("--siglip-weights", help="initialise the encoder from a SigLIP safetensors file")
    p.add_argument("--freeze-encoder", action="store_true", help="train only quantizer + adapter + projector")
    p.add_argument("--llm-preset", default="tiny", help="model_preset of the frozen LLM")
    p.add_argument("--llm-checkpoint", help="trained LLM: a teacher folder or a megatron dist-ckpt root")
    p.add_argument("--llm-warmup-steps", type=int, default=0, help="text-only LM steps before freezing the LLM")
    p.add_argument("--text-tokenizer", help="XOmniTextTokenizer folder (default: train the world sentencepiece)")
    p.add_argument("--projector", choices=["mlp", "linear"], default="mlp")
    p.add_argument("--max-qa-pairs", type=int, default=8, help="QA pairs of meta['qa'] appended to the caption")
    p.add_argument("--reseed-every", type=int, default=50, help="dead-code re-seeding period (0: off)")
    p.add_argument("--reseed-until", type=int, help="last step that may re-seed")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100, help="resumable checkpoint period")
    p.add_argument("--eval-world", type=int, default=64, help="held-out world images to evaluate on (0: none)")
    p.add_argument("--image-size", type=int, default=64, help="side of the held-out world eval images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    args = p.parse_args(argv)

    overrides = {}
    for item in args.tokenizer_override:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--tokenizer-override {item!r}: use FIELD=JSON_VALUE")
        overrides[key] = json.loads(value)

    _single_process_env()
    import torch.distributed as dist

    from megatron_xomni.parallel import ParallelConfig, initialize_parallel, destroy_parallel
    from megatron_xomni.training.siglip_vq import TokenizerTrainConfig, TokenizerTrainer, world_eval_set

    try:
        cfg = TokenizerTrainConfig(
            tokenizer_preset=args.tokenizer_preset, tokenizer_overrides=overrides, init_tokenizer=args.init_tokenizer,
            siglip_weights=args.siglip_weights, freeze_encoder=args.freeze_encoder, llm_preset=args.llm_preset,
            llm_checkpoint=args.llm_checkpoint, llm_warmup_steps=args.llm_warmup_steps, projector=args.projector,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_qa_pairs=args.max_qa_pairs,
            reseed_every=args.reseed_every, reseed_until=args.reseed_until, log_every=args.log_every,
            save_every=args.save_every, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pg = initialize_parallel(ParallelConfig(), seed=args.seed)
    try:
        eval_set = world_eval_set(args.eval_world, args.image_size) if args.eval_world else None
        rank = dist.get_rank()
        log = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
        log(f"tokenizer training: {dist.get_world_size()} rank(s), global batch {cfg.batch_size}, {cfg.steps} steps")
        trainer = TokenizerTrainer(cfg, args.corpus, args.out, pg, text_tokenizer=args.text_tokenizer,
                                   eval_set=eval_set, resume=not args.no_resume, log=log)
        result = trainer.train()
        if rank == 0:
            summary = {k: result[k] for k in ("eval_before", "eval_after") if k in result}
            (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log(f"wrote {args.out}/tokenizer, {args.out}/projector.safetensors; summary {json.dumps(summary)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
