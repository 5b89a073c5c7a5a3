"""`make scaling` (`xomni scaling tiny`): a real iso-FLOP sweep on the built-in world corpus on CPU.

Parts, each timed and printed:
1. data: the demo's tokenized corpus (<demo>/tokens, complete when world.json exists) is reused;
   otherwise a small one is built into <out>/data: world corpus -> sentencepiece text tokenizer ->
   a random tiny SigLIP-VQ image tokenizer (the `tiny` preset, seeded; not trained) -> tokenize;
2. plan: 4 depths x 3 budgets of the tiny_pt recipe (the family's head size and aspect ratio
   scaled down so that the CPU-sized budgets bracket the compute-optimal size; see SWEEP below);
3. launch: the 12 runs one after another in this process (a rerun skips finished runs);
4. collect: <out>/runs.csv;
5. fit: text and image loss, <out>/fit/summary.md and plots.
Timings go to <out>/timings.json; reports/scaling_tiny/ is a committed copy of one run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_xomni.scaling.plan import SWEEP_FILE, PlanRequest

TEXT_VOCAB = 512  # the tiny model's text table (as the demo)
CORPUS_SAMPLES = 4000
# A skinny family (head size 8, aspect ratio 16: hidden = 16 x depth): depths 1-4 span 25k-337k
# non-embedding parameters. On the built-in world the compute-optimal size at 1e11-6e11 FLOPs (what
# 2 CPU cores train in minutes) is a few 10k parameters, so the sizes must start that small for the
# iso-FLOP curves to turn; wider members (the default aspect ratio 64) all lose to the smallest one
# at these budgets. Batch and learning rate follow the family's documented rules. 12 validation
# batches per evaluation (192-384 sequences, most of the 10 % validation split): with 4, one run's
# image loss moved by 0.07 nats between neighbouring evaluations, as much as a size step.
SWEEP = {"depths": [1, 2, 3, 4], "budgets": [1e11, 2.5e11, 6e11],
         "family": ["aspect_ratio=16", "head_dim=8"], "evals": 4, "eval_iters": 12}
QUICK = {"depths": [1, 2, 3], "budgets": [1e10, 2e10, 4e10],
         "family": ["aspect_ratio=16", "head_dim=8"], "evals": 2, "eval_iters": 1}


def _say(msg: str) -> None:
    print(f"[scaling tiny] {msg}", flush=True)


def build_tokens(out: Path, samples: int = CORPUS_SAMPLES, seed: int = 0) -> tuple[Path, dict]:
    """A small tokenized world corpus in out/ (each part resumes or is skipped when done); returns
    the summary (world.json) and the seconds of each part that ran."""
    from megatron_xomni.data import write_world_corpus
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts
    from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig, tokenize_corpus

    summary, corpus, tok_dir = out / "tokens" / "world.json", out / "corpus", out / "text_tokenizer"
    times = {}
    t = time.perf_counter()
    if not (corpus / "index.json").exists():
        write_world_corpus(corpus, samples, seed=seed, height=64, width=64, samples_per_shard=1000, overwrite=True)
        times["corpus"] = time.perf_counter() - t
    t = time.perf_counter()
    if not (tok_dir / "tokenizer").exists():
        model = train_sentencepiece(world_texts(num_samples=2000, seed=seed), tok_dir / "sp", vocab_size=TEXT_VOCAB)
        XOmniTextTokenizer.from_sentencepiece(model).save(tok_dir / "tokenizer")
        times["text tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    if not summary.exists():
        tokenize_corpus(TokenizeRunConfig(
            corpus=str(corpus), save_dir=str(out / "tokens"), prefix="world", text_tokenizer=str(tok_dir / "tokenizer"),
            image_tokenizer="tiny", seed=seed, mode="both", workers=1, progress=False,
            text_vocab_size=TEXT_VOCAB, preprocess="tiny"))
        times["tokenize (random tiny image tokenizer)"] = time.perf_counter() - t
    return summary, times


def blend_overrides(summary: Path, cache_dir: Path) -> list[str]:
    """data.* overrides for the tiny_pt recipe from a tokenization summary (the demo's blend weights);
    megatron-core's sample indices go to cache_dir (not into a reused demo folder)."""
    s = json.loads(summary.read_text())
    weights = {"generation": 0.7, "understanding": 0.3}
    blend = []
    for mode, prefix in s["blend"].items():
        blend += [weights[mode], prefix]
    return [f"data.blend={json.dumps(blend)}", f"data.eod_id={s['eod_id']}",
            f"data.cache_dir={cache_dir}",
            "data.split=90,10,0",  # a validation set large enough for steady losses
            "data.micro_batch_size=16"]  # fewer, larger micro-batches: the small members are overhead-bound


def main(out: str = "runs/scaling_tiny", demo: str = "runs/demo", quick: bool = False) -> int:
    from megatron_xomni.scaling.cli import fit_report
    from megatron_xomni.scaling.collect import collect, write_table
    from megatron_xomni.scaling.launch import launch_local
    from megatron_xomni.scaling.plan import plan, read_sweep, write_sweep

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        # The members (hidden 16-64) are overhead-bound: one thread. Measured on the shared 2-core
        # machine, the first run did ~1.3 steps/s with torch's default 2 threads against ~19 with one.
        torch.set_num_threads(1)
    root = Path(out)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    demo_summary = Path(demo) / "tokens" / "world.json"
    if demo_summary.exists():
        summary, source = demo_summary, f"reused the demo's tokenized corpus {demo_summary.parent}"
    else:
        _say(f"no complete demo corpus at {demo_summary.parent}: using a small one in {root / 'data'}")
        summary, parts = build_tokens(root / "data")
        for part, sec in parts.items():
            _say(f"data: {part} {sec:.1f} s")
        source = (f"{'built' if parts else 'reused'} {root / 'data'}: {CORPUS_SAMPLES} world images -> "
                  "sentencepiece text tokenizer -> random tiny SigLIP-VQ image tokenizer -> tokens")
    timings["data"] = time.perf_counter() - t
    _say(f"data: {source} ({timings['data']:.1f} s)")

    t = time.perf_counter()
    design = QUICK if quick else SWEEP
    path = root / SWEEP_FILE
    sweep = plan(PlanRequest(recipe="tiny_pt", out=str(root), depths=design["depths"], budgets=design["budgets"],
                             overrides=blend_overrides(summary, root / "cache"), family=design["family"],
                             evals=design["evals"], eval_iters=design["eval_iters"], name=root.name))
    if path.exists() and read_sweep(path)["runs"] != sweep["runs"]:
        raise ValueError(f"{path} holds another plan (other data or settings): remove {root} to start over")
    write_sweep(sweep, path)
    timings["plan"] = time.perf_counter() - t
    _say(f"plan: {len(sweep['runs'])} runs ({len(design['depths'])} depths x {len(design['budgets'])} budgets) "
         f"({timings['plan']:.1f} s)")

    t = time.perf_counter()
    rc = launch_local(sweep)
    timings["launch"] = time.perf_counter() - t
    if rc:
        return rc
    _say(f"launch: {timings['launch']:.1f} s")

    t = time.perf_counter()
    rows = collect(sweep)
    table = write_table(rows, root / "runs.csv")
    timings["collect"] = time.perf_counter() - t
    _say(f"collect: {table} ({timings['collect']:.1f} s)")

    t = time.perf_counter()
    fits, paths = fit_report(table, root / "fit", title="Scaling-law fit: tiny X-Omni on the built-in world (CPU)",
                             bootstrap_starts=4)
    timings["fit"] = time.perf_counter() - t
    for col, f in fits.items():
        a3, a2 = f.approach3, f.approach2
        _say(f"fit {col}: alpha {a3.alpha}, beta {a3.beta}; N_opt ∝ C^a, a = {a3.params_exponent} (approach 3)"
             + (f", {a2.a} (approach 2)" if a2 is not None else f"; approach 2: {f.approach2_note}"))
    _say(f"fit: {root / 'fit'} ({timings['fit']:.1f} s)")
    timings["total"] = sum(timings.values())
    (root / "timings.json").write_text(json.dumps({"data_source": source, "seconds": timings,
                                                  "wall_seconds_per_run": {r["name"]: r["wall_seconds"] for r in rows}},
                                                 indent=1) + "\n")
    _say("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0
