"""The stages of the tiny demo pipeline (see demo.py). Each returns a dict saved in DONE.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_xomni.pipeline.demo import DemoContext

TEXT_VOCAB = 512  # the tiny model's text table (sentencepiece world vocabulary fits exactly)


def corpus(ctx: DemoContext) -> dict:
    from megatron_xomni.data import write_world_corpus

    cfg = ctx.cfg
    out = ctx.dir("corpus") / "train"
    manifest = write_world_corpus(out, cfg.corpus_samples, seed=cfg.seed, height=cfg.image_size,
                                  width=cfg.image_size, samples_per_shard=500, overwrite=True)
    return {"path": str(out), "samples": manifest.num_samples}


def text_tokenizer(ctx: DemoContext) -> dict:
    from megatron_xomni.text import XOmniTextTokenizer, train_sentencepiece, world_texts

    d = ctx.dir("text_tokenizer")
    model = train_sentencepiece(world_texts(num_samples=2000, seed=ctx.cfg.seed), d / "sp", vocab_size=TEXT_VOCAB)
    tok = XOmniTextTokenizer.from_sentencepiece(model)
    tok.check_text_vocab(TEXT_VOCAB)
    tok.save(d / "tokenizer")
    return {"path": str(d / "tokenizer"), "vocab_size": tok.vocab_size}


def image_tokenizer(ctx: DemoContext) -> dict:
    d = ctx.dir("image_tokenizer")
    cfg = ctx.cfg
    ctx.run([sys.executable, "tools/train_tokenizer.py", "--corpus", str(ctx.out / "corpus" / "train"),
             "--out", str(d / "run"), "--steps", str(cfg.tokenizer_steps),
             "--text-tokenizer", str(ctx.out / "text_tokenizer" / "tokenizer"), "--seed", str(cfg.seed)],
            "image_tokenizer")
    summary = d / "run" / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {"path": str(d / "run")}


def image_tokenizer_path(ctx: DemoContext) -> str:
    return str(ctx.out / "image_tokenizer" / "run" / "tokenizer")


def tokenize(ctx: DemoContext) -> dict:
    from megatron_xomni.tokenize import TokenizeConfig, tokenize_corpus

    d = ctx.dir("tokens")
    prefix = d / "world"
    summary = tokenize_corpus(TokenizeConfig(
        corpus=str(ctx.out / "corpus" / "train"), out_prefix=str(prefix),
        text_tokenizer=str(ctx.out / "text_tokenizer" / "tokenizer"),
        image_tokenizer=image_tokenizer_path(ctx), mode="both", workers=1,
        resume=True, text_vocab_size=TEXT_VOCAB,  # continues an interrupted run; fresh otherwise
    ))
    return {"prefix": str(prefix), "summary": summary}


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
            f"data.cache_dir={ctx.out / 'tokens' / 'cache'}", f"train_iters={iters}", f"seed={ctx.cfg.seed}",
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
