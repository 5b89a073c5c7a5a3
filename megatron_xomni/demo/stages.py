"""The stages of the tiny demo pipeline (see demo.py). Each returns a dict saved in DONE.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_xomni.demo.runner import DemoContext

TEXT_VOCAB = 512  # the tiny model's text table (sentencepiece world vocabulary fits exactly)


def corpus(ctx: DemoContext) -> dict:
    from megatron_xomni.data import write_world_corpus

    cfg = ctx.cfg
    out = ctx.dir("corpus") / "train"
    manifest = write_world_corpus(out, cfg.corpus_samples, seed=cfg.seed, height=cfg.image_size,
                                  width=cfg.image_size, samples_per_shard=500, overwrite=True)
    return {"path": str(out), "samples": manifest.num_samples}


def _run_in_process(recipe: str, overrides: list[str]) -> None:
    """A non-distributed stage (one process that starts its own workers): run its recipe here."""
    from megatron_xomni.recipes import load_recipe
    from megatron_xomni.train import run_config

    code = run_config(load_recipe(recipe, overrides))
    if code != 0:
        raise RuntimeError(f"{recipe} failed with exit code {code}")


def text_tokenizer_path(ctx: DemoContext) -> str:
    return str(ctx.out / "text_tokenizer" / "tokenizer")


def text_tokenizer(ctx: DemoContext) -> dict:
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer

    ctx.dir("text_tokenizer")
    _run_in_process("tiny_text_tokenizer", [f"save_dir={text_tokenizer_path(ctx)}", f"seed={ctx.cfg.seed}",
                                            f"text_vocab_size={TEXT_VOCAB}"])
    return {"path": text_tokenizer_path(ctx), "vocab_size": XOmniTextTokenizer.load(text_tokenizer_path(ctx)).vocab_size}


def image_tokenizer(ctx: DemoContext) -> dict:
    from megatron_xomni.demo.quality import contrastive_path

    cfg = ctx.cfg
    save = ctx.dir("image_tokenizer") / "run"
    steps = cfg.tokenizer_steps
    # A frozen random LLM is a weak teacher: it is warmed up on world captions first (the recipe's rule).
    # The ViT starts from the contrastive stage (X-Omni starts from a pretrained SigLIP2).
    ctx.torchrun("tiny_siglip_vq", [
        f"data.corpus={ctx.out / 'corpus' / 'train'}", f"data.text_tokenizer={text_tokenizer_path(ctx)}",
        f"save_dir={save}", f"steps={steps}", f"teacher.warmup_steps={max(min(300, steps // 2), 1)}",
        f"tokenizer.init_from={contrastive_path(ctx)}", f"codebook.reseed_until={int(0.8 * steps)}",
        f"seed={cfg.seed}", "eval.world_samples=32", f"eval.image_size={cfg.image_size}",
        f"save_interval={max(cfg.tokenizer_steps // 4, 1)}", f"log_interval={max(cfg.tokenizer_steps // 20, 1)}",
        f"schedule.warmup_steps={min(20, cfg.tokenizer_steps - 1)}"], "image_tokenizer")
    return json.loads((save / "export" / "summary.json").read_text())


def image_tokenizer_path(ctx: DemoContext) -> str:
    return str(ctx.out / "image_tokenizer" / "run" / "export" / "tokenizer")


def tokenize(ctx: DemoContext) -> dict:
    d = ctx.dir("tokens")
    _run_in_process("tiny_tokenize", [
        f"corpus={ctx.out / 'corpus' / 'train'}", f"save_dir={d}", "prefix=world",
        f"text_tokenizer={text_tokenizer_path(ctx)}", f"image_tokenizer={image_tokenizer_path(ctx)}",
        f"text_vocab_size={TEXT_VOCAB}"])  # continues an interrupted run; fresh otherwise
    return {"prefix": str(d / "world"), "summary": json.loads((d / "world.json").read_text())}


def _blend(ctx: DemoContext) -> tuple[list, int]:
    summary = json.loads((ctx.out / "tokens" / "world.json").read_text())
    weights = {"generation": 0.7, "understanding": 0.3}  # generation-heavy, like X-Omni's PT-2
    flat = []
    for mode, prefix in summary["blend"].items():
        flat += [weights[mode], prefix]
    return flat, int(summary["eod_id"])


def _train_overrides(ctx: DemoContext, save_dir: Path, iters: int) -> list[str]:
    blend, eod = _blend(ctx)
    return [f"data.blend={json.dumps(blend)}", f"data.eod_id={eod}", f"save_dir={save_dir}",
            f"data.cache_dir={ctx.out / 'tokens' / 'cache'}", f"steps={iters}", f"seed={ctx.cfg.seed}",
            f"save_interval={max(iters // 4, 1)}", f"log_interval={max(iters // 20, 1)}"]


def pretrain(ctx: DemoContext) -> dict:
    save = ctx.dir("pretrain") / "ckpt"
    ctx.torchrun("tiny_pt", _train_overrides(ctx, save, ctx.cfg.pt_iters), "pretrain")
    return {"checkpoint": str(save), **_metrics_summary(save)}


def sft(ctx: DemoContext) -> dict:
    save = ctx.dir("sft") / "ckpt"
    ctx.torchrun("tiny_sft", _train_overrides(ctx, save, ctx.cfg.sft_iters) + [f"init_from={ctx.out / 'pretrain' / 'ckpt'}"], "sft")
    return {"checkpoint": str(save), **_metrics_summary(save)}


def _metrics_summary(save_dir: Path) -> dict:
    path = Path(save_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(l) for l in path.read_text().splitlines() if l]
    return {"first_loss": recs[0]["train_loss"], "last_loss": recs[-1]["train_loss"],
            "tokens_per_s": recs[-1].get("throughput_tokens_per_s")}


def _artifacts(ctx: DemoContext) -> list[str]:
    return ["--text-tokenizer", text_tokenizer_path(ctx),
            "--image-tokenizer", image_tokenizer_path(ctx), "--decoder", decoder_path(ctx)]


def decoder_path(ctx: DemoContext) -> str:
    return str(ctx.out / "decoder" / "export")


# The world's detector-scored skills: the text skill needs OCR, which the tiny policy cannot pass.
EVAL_SKILLS = "single_object,two_objects,counting,colors,position,color_attr"


def _evaluate(ctx: DemoContext, ckpt: Path, name: str) -> dict:
    """`xomni evaluate --benchmark world` on the policy: eval.json (rewards, best-of-N, ceiling, per-skill
    accuracy) and samples.png, the same evaluation path users run."""
    cfg = ctx.cfg
    out = ctx.dir(name)
    size = f"{cfg.image_size}x{cfg.image_size}"
    ctx.run([sys.executable, "-m", "megatron_xomni.cli", "evaluate", "--benchmark", "world", "--model", str(ckpt),
             *_artifacts(ctx), "--out", str(out), "--per-skill", str(cfg.eval_per_skill),
             "--images-per-prompt", str(cfg.eval_samples), "--size", size, "--skills", EVAL_SKILLS,
             "--rewards", "world_alignment=1.0", "--decoder-steps", str(cfg.decoder_sample_steps),
             "--seed", str(cfg.seed + 2024), "--batch-size", "64", "--no-progress",
             "--decoder-seeds", str(cfg.eval_decoder_seeds)], name)
    return json.loads((out / "eval.json").read_text())


def eval_sft(ctx: DemoContext) -> dict:
    return _evaluate(ctx, ctx.out / "sft" / "ckpt", "eval_sft")


def grpo(ctx: DemoContext) -> dict:
    cfg = ctx.cfg
    save = ctx.dir("grpo") / "ckpt"
    ctx.torchrun("tiny_grpo", [
        f"init_from={ctx.out / 'sft' / 'ckpt'}", f"text_tokenizer={text_tokenizer_path(ctx)}",
        f"image_tokenizer={image_tokenizer_path(ctx)}", f"decoder={decoder_path(ctx)}", f"save_dir={save}",
        f"steps={cfg.grpo_steps}", f"prompts_per_step={cfg.grpo_prompts}", f"group_size={cfg.grpo_group}",
        f"grpo.micro_batch_size={cfg.grpo_group}", f"optim.lr={cfg.grpo_lr}", f"optim.min_lr={cfg.grpo_lr}",
        f"grpo.kl_beta={cfg.grpo_kl_beta}", f"shared_decoder_seed={cfg.grpo_shared_decoder_seed}",
        f"reward_decodes={cfg.grpo_reward_decodes}",
        f"decoder_steps={cfg.decoder_sample_steps}", f"image_height={cfg.image_size}", f"image_width={cfg.image_size}",
        f"seed={cfg.seed}", f"save_interval={max(cfg.grpo_steps // 4, 1)}",
    ], "grpo")
    recs = [json.loads(l) for l in (save / "metrics.jsonl").read_text().splitlines() if l]
    return {"checkpoint": str(save), "first_reward": recs[0]["reward_mean"], "last_reward": recs[-1]["reward_mean"],
            "mean_dropped_group_share": sum(r.get("grpo_dropped_group_share", 0.0) for r in recs) / len(recs)}


def eval_grpo(ctx: DemoContext) -> dict:
    return _evaluate(ctx, ctx.out / "grpo" / "ckpt", "eval_grpo")


def make_bundle(ctx: DemoContext) -> Path:
    """`<out>/bundle`: the GRPO policy and its frozen parts in the layout `xomni generate --bundle` reads."""
    bundle = ctx.dir("bundle")
    parts = {"model": ctx.out / "grpo" / "ckpt", "text_tokenizer": Path(text_tokenizer_path(ctx)),
             "image_tokenizer": Path(image_tokenizer_path(ctx)), "decoder": Path(decoder_path(ctx))}
    for name, target in parts.items():
        link = bundle / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)
    return bundle


def report(ctx: DemoContext) -> dict:
    """report.md + curves.png (demo/report.py): the targets table, rewards, ceiling, noise floor,
    per-skill accuracy before/after RL, curves and sample grids; figures.json holds the target figures."""
    from megatron_xomni.data.image_grid import ImageGrid
    from megatron_xomni.demo import report as rep
    from megatron_xomni.models.siglip_vq.model import check_pretrained

    out, cfg = ctx.out, ctx.cfg
    rep.curves(out, {"pretrain": out / "pretrain" / "ckpt" / "metrics.jsonl",
                     "sft": out / "sft" / "ckpt" / "metrics.jsonl", "grpo": out / "grpo" / "ckpt" / "metrics.jsonl"})
    grid = ImageGrid.from_pixels(cfg.image_size, cfg.image_size, check_pretrained(image_tokenizer_path(ctx)).patch_size)
    sft, rl = json.loads((out / "eval_sft" / "eval.json").read_text()), json.loads((out / "eval_grpo" / "eval.json").read_text())
    ceiling = rep.ceiling_figures(ctx, sft)
    timings = {k: v for k, v in ctx.timings.items() if k != "report"}
    fig = rep.target_figures(sft, rl, ceiling, sum(timings.values()))
    settings = {"steps": cfg.grpo_steps, "prompts/step": cfg.grpo_prompts, "G": cfg.grpo_group, "lr": cfg.grpo_lr,
                "kl_beta": cfg.grpo_kl_beta, "shared_decoder_seed": cfg.grpo_shared_decoder_seed,
                "reward_decodes": cfg.grpo_reward_decodes}
    text = rep.render(cfg, grid, sft, rl, ceiling, fig, timings, out / "bundle", settings)
    (out / "report.md").write_text(text)
    (out / "figures.json").write_text(json.dumps(fig, indent=2))
    make_bundle(ctx)
    return {"figures": fig, "targets": [{"target": t, "measured": v, "met": m, "margin": g}
                                        for t, v, m, g in rep.targets(fig)]}


def decoder(ctx: DemoContext) -> dict:
    cfg = ctx.cfg
    d = ctx.dir("decoder")
    ctx.torchrun("tiny_decoder", [
        f"save_dir={d}", f"steps={cfg.decoder_steps}", f"image_size={cfg.image_size}",
        f"image_tokenizer={image_tokenizer_path(ctx)}", f"seed={cfg.seed}", f"sample_steps={cfg.decoder_sample_steps}",
        f"save_interval={max(cfg.decoder_steps // 4, 1)}", f"vae_fit_steps={cfg.vae_fit_steps}",
        f"schedule.warmup_steps={min(20, cfg.decoder_steps - 1)}"], "decoder")
    return {"export": decoder_path(ctx)}


from megatron_xomni.demo.quality import ceiling, contrastive, tokenizer_health  # noqa: E402 (stages of ALL)

ALL = ["corpus", "text_tokenizer", "contrastive", "image_tokenizer", "tokenizer_health", "tokenize", "pretrain",
       "sft", "decoder", "ceiling", "eval_sft", "grpo", "eval_grpo", "report"]
