"""The demo's tokenizer/decoder stages beyond training: contrastive pre-training, the tokenizer's health
(caption gap, linear probes, code usage) and the decoder's rendering ceiling, with the gates that warn
when the pipeline cannot show X-Omni's result (issue 11: gap >= 5 %, ceiling >= 0.85)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_xomni.demo.runner import DemoContext

GAP_MIN_PCT = 5.0
"""Shuffled-image caption loss must exceed the right-image loss by this much: the codes say something."""
CEILING_MIN = 0.85
"""Partial-credit reward of ground-truth codes through the decoder: below it, RL has little room to show."""
CEILING_SKILLS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def contrastive_path(ctx: DemoContext) -> str:
    return str(ctx.out / "contrastive" / "run" / "export" / "tokenizer")


def contrastive(ctx: DemoContext) -> dict:
    """SigLIP contrastive pre-training of the tiny ViT on the corpus captions (the VQ stage starts from it)."""
    from megatron_xomni.demo.stages import text_tokenizer_path

    cfg = ctx.cfg
    save = ctx.dir("contrastive") / "run"
    steps = cfg.contrastive_steps
    ctx.torchrun("tiny_siglip_contrastive", [
        f"data.corpus={ctx.out / 'corpus' / 'train'}", f"data.text_tokenizer={text_tokenizer_path(ctx)}",
        f"save_dir={save}", f"steps={steps}", f"seed={cfg.seed}", f"eval.image_size={cfg.image_size}",
        f"save_interval={max(steps // 2, 1)}", f"log_interval={max(steps // 10, 1)}",
        f"schedule.warmup_steps={min(50, steps - 1)}"], "contrastive")
    return json.loads((save / "export" / "summary.json").read_text())


def warn(ctx: DemoContext, msg: str) -> None:
    ctx.log(f"WARNING: {msg}")


def tokenizer_health(ctx: DemoContext) -> dict:
    """Caption gap (from the VQ stage's eval), linear probes and code usage; also into its TensorBoard."""
    from megatron_xomni.demo.stages import image_tokenizer_path
    from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
    from megatron_xomni.training.metrics import MetricsLogger
    from megatron_xomni.training.tokenizer_health import caption_gap_pct, probe_report

    cfg = ctx.cfg
    run = ctx.out / "image_tokenizer" / "run"
    summary = json.loads((run / "export" / "summary.json").read_text())
    gap, gap_before = caption_gap_pct(summary["eval_after"]), caption_gap_pct(summary["eval_before"])
    tok = SiglipVQTokenizer.from_pretrained(image_tokenizer_path(ctx))
    probes = probe_report(tok, cfg.image_size, n_train=cfg.probe_train, n_test=cfg.probe_test, seed=cfg.seed)
    scalars = {"health/caption_gap_pct": gap, **{f"health/probe_{k}": probes[k] for k in ("colour", "shape", "count", "position")},
               "health/code_usage": probes["codes_all"]["usage"], "health/code_perplexity": probes["codes_all"]["perplexity"],
               "health/object_code_perplexity": probes["codes_object_tokens"]["perplexity"]}
    logger = MetricsLogger(str(run / "tensorboard"), str(ctx.dir("tokenizer_health") / "metrics.jsonl"), enabled=True,
                           name="tokenizer_health", total_steps=summary["steps"], start_step=summary["steps"])
    logger.log(summary["steps"], scalars, f"    tokenizer health: caption gap {gap:.1f} % (before training {gap_before:.1f} %), "
               f"probes colour {probes['colour']:.2f} shape {probes['shape']:.2f} count {probes['count']:.2f} "
               f"position {probes['position']:.2f}, code perplexity {probes['codes_all']['perplexity']:.1f}")
    logger.close()
    if gap < GAP_MIN_PCT:
        warn(ctx, f"the tokenizer's shuffled-image caption gap is {gap:.1f} % (< {GAP_MIN_PCT:.0f} %): its codes "
                  "barely inform the LLM")
    return {"caption_gap_pct": gap, "caption_gap_pct_before": gap_before, "probes": probes,
            "gate_gap_ok": gap >= GAP_MIN_PCT}


def ceiling(ctx: DemoContext) -> dict:
    """Ground-truth codes -> decoder (K seeds) -> world detector, per skill; and the same for the decoder
    before training (its fitted VAE, a zero semantic projection), the direction check."""
    from megatron_xomni.demo.stages import decoder_path, image_tokenizer_path
    from megatron_xomni.inference.ceiling import rendering_ceiling
    from megatron_xomni.models.flux_decoder.model import XOmniDecoder, build_decoder
    from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
    from megatron_xomni.data.world_source import WorldPromptSource

    cfg = ctx.cfg
    tok = SiglipVQTokenizer.from_pretrained(image_tokenizer_path(ctx)).eval()
    held_out = WorldPromptSource("heldout", seed=12345, skills=CEILING_SKILLS, height=cfg.image_size,
                                 width=cfg.image_size)
    prompts = [held_out.sample(i) for i in range(cfg.eval_per_skill * len(CEILING_SKILLS))]
    trained = XOmniDecoder.from_pretrained(decoder_path(ctx)).eval()
    got = rendering_ceiling(tok, trained, prompts, seeds=cfg.ceiling_seeds, steps=cfg.decoder_sample_steps,
                            base_seed=cfg.seed + 2024)
    init = ctx.out / "decoder" / "init"
    untrained = (XOmniDecoder.from_pretrained(init) if (init / "decoder_config.json").exists()
                 else build_decoder(trained.cfg, seed=cfg.seed)).eval()
    base = rendering_ceiling(tok, untrained, prompts, seeds=1, steps=cfg.decoder_sample_steps, base_seed=cfg.seed + 2024)
    ctx.log(f"    rendering ceiling {got['ceiling']:.3f} (untrained decoder {base['ceiling']:.3f}), per skill "
            + ", ".join(f"{k} {v:.2f}" for k, v in got["per_skill"].items())
            + f"; decoder-seed share of the variance {got['seed_variance_share']:.2f}")
    from megatron_xomni.training.metrics import MetricsLogger

    steps = cfg.decoder_steps
    logger = MetricsLogger(str(ctx.out / "decoder" / "tensorboard"), str(ctx.dir("ceiling") / "metrics.jsonl"),
                           enabled=True, name="ceiling", total_steps=steps, start_step=steps)
    logger.log(steps, {"ceiling/partial_credit": got["ceiling"], "ceiling/untrained": base["ceiling"],
                       "ceiling/seed_variance_share": got["seed_variance_share"],
                       **{f"ceiling/{k}": v for k, v in got["per_skill"].items()}})
    logger.close()
    if got["ceiling"] < CEILING_MIN:
        warn(ctx, f"the rendering ceiling is {got['ceiling']:.3f} (< {CEILING_MIN}): the decoder cannot render what "
                  "the codes say, so RL has little room to show")
    got.pop("rewards")
    return {**got, "untrained_ceiling": base["ceiling"], "gate_ceiling_ok": got["ceiling"] >= CEILING_MIN}


def stage_times(out: Path, names) -> dict:
    """Seconds per finished stage (DONE.json), for the time budget."""
    times = {}
    for n in names:
        p = Path(out) / n / "DONE.json"
        if p.exists():
            times[n] = json.loads(p.read_text())["seconds"]
    return times
