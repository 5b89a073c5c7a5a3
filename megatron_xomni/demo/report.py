"""The demo's report: issue 11's figures and targets from the two evaluations and the GRPO run.

Every reward figure is the world detector's *partial credit* (the fraction of a prompt's checks
that pass: the RL reward); per-skill *accuracy* is GenEval-style all-or-nothing (every check of
the prompt must pass). Both evaluations use the same held-out prompts and seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CEILING_TARGET = 0.85
NOISE_TARGET = 0.10
BUDGET_SECONDS = 15 * 60


def ceiling_figures(ctx, sft: dict) -> dict:
    """{"ceiling": partial credit of ground-truth codes rendered by the frozen decoder, "per_skill": ...}
    (`ctx` None: a report built from evaluations alone).

    The demo's ceiling stage (demo/quality.py: K decoder seeds per image, next to the untrained
    decoder's) when it ran; otherwise what the SFT evaluation measured on its own prompts
    (ground-truth images -> frozen tokenizer -> decoder -> detector).
    """
    done = Path(ctx.out) / "ceiling" / "DONE.json" if ctx is not None else None
    if done is not None and done.exists():
        c = json.loads(done.read_text())
        return {"ceiling": c["ceiling"], "per_skill": c.get("per_skill", {}),
                "untrained": c.get("untrained_ceiling"), "source": "ceiling stage"}
    return {"ceiling": sft.get("ground_truth_codes_reward", float("nan")),
            "per_skill": sft.get("ground_truth_codes_reward_per_skill", {}), "source": "SFT evaluation"}


def _mean(e: dict) -> float:
    """A policy's mean single-sample reward: over every decode when several were made."""
    return e.get("mean_reward_all_decodes", e["mean_reward"])


def target_figures(sft: dict, rl: dict, ceiling: dict, seconds: float) -> dict:
    """The numbers the targets read (also what `--seeds` spreads over pipeline seeds)."""
    acc_s, acc_r = sft["per_skill_metrics"]["accuracy"], rl["per_skill_metrics"]["accuracy"]
    nf = sft.get("noise_floor", {})
    fig = {
        "sft_mean": _mean(sft), "sft_best_of_n": sft["best_of_n_reward"],
        "sft_honest_best_of_n": sft.get("honest_best_of_n_reward", float("nan")),
        "grpo_mean": _mean(rl), "grpo_best_of_n": rl["best_of_n_reward"],
        "grpo_honest_best_of_n": rl.get("honest_best_of_n_reward", float("nan")),
        "ceiling": ceiling["ceiling"],
        "decoder_share_within_independent": nf.get("decoder_share_within", float("nan")),
        "decoder_share_within_shared_seed": nf.get("decoder_share_within_shared_seed", float("nan")),
        "decoder_share_overall": nf.get("decoder_share_overall", float("nan")),
        "min_skill_gain": min(acc_r[k] - acc_s[k] for k in acc_s),
        "pipeline_seconds": seconds,
    }
    fig["grpo_mean_minus_sft_honest"] = fig["grpo_mean"] - fig["sft_honest_best_of_n"]
    return fig


def targets(fig: dict) -> list[tuple[str, str, bool, str]]:
    """(target, measured, met, by how much) rows."""
    def row(name, value, threshold, higher=True, fmt="{:.3f}"):
        met = value > threshold if higher else value < threshold
        if math.isnan(value):
            return name, "n/a", False, "not measured"
        gap = value - threshold
        return name, fmt.format(value), met, ("+" if gap >= 0 else "") + fmt.format(gap)

    return [
        row("GRPO mean > SFT honest best-of-N", fig["grpo_mean"], fig["sft_honest_best_of_n"]),
        row("every skill's accuracy up after RL (smallest gain > 0)", fig["min_skill_gain"], 0.0),
        row(f"ceiling >= {CEILING_TARGET}", fig["ceiling"], CEILING_TARGET - 1e-12),
        row(f"decoder-seed share of within-group variance < {NOISE_TARGET:.0%} (shared seed, as GRPO decodes)",
            fig["decoder_share_within_shared_seed"], NOISE_TARGET, higher=False),
        row(f"pipeline <= {BUDGET_SECONDS // 60} min (this run's stages)", fig["pipeline_seconds"], BUDGET_SECONDS,
            higher=False, fmt="{:.0f}"),
    ]


def _skills_table(sft: dict, rl: dict, ceiling: dict) -> str:
    ms, mr = sft["per_skill_metrics"], rl["per_skill_metrics"]
    lines = ["| skill | ceiling (partial) | SFT accuracy | GRPO accuracy | change | SFT partial | GRPO partial |",
             "|---|---|---|---|---|---|---|"]
    for k in ms["accuracy"]:
        c = ceiling["per_skill"].get(k, float("nan"))
        a, b = ms["accuracy"][k], mr["accuracy"].get(k, float("nan"))
        lines.append(f"| {k} | {c:.3f} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {ms['partial_credit'][k]:.3f} | "
                     f"{mr['partial_credit'].get(k, float('nan')):.3f} |")
    lines.append(f"| **overall** | **{ceiling['ceiling']:.3f}** | **{ms['overall_accuracy']:.3f}** | "
                 f"**{mr['overall_accuracy']:.3f}** | {mr['overall_accuracy'] - ms['overall_accuracy']:+.3f} | "
                 f"**{ms['overall_partial_credit']:.3f}** | **{mr['overall_partial_credit']:.3f}** |")
    return "\n".join(lines)


def _noise_table(sft: dict, rl: dict) -> str:
    lines = ["| policy | decoder seeds | within-group variance | decoder-seed share (independent seeds) | "
             "decoder-seed share (one seed per group) | overall variance | decoder-seed share overall |",
             "|---|---|---|---|---|---|---|"]
    for name, e in (("SFT", sft), ("GRPO", rl)):
        nf = e.get("noise_floor")
        if nf:
            lines.append(f"| {name} | {nf['decoder_seeds']} | {nf['within_total']:.4f} | {nf['decoder_share_within']:.1%} | "
                         f"{nf['decoder_share_within_shared_seed']:.1%} | {nf['overall_total']:.4f} | "
                         f"{nf['decoder_share_overall']:.1%} |")
    return "\n".join(lines)


def curves(out: Path, metrics: dict[str, Path]) -> Path:
    """curves.png: AR losses, GRPO reward, entropy, KL and dropped-group share per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path):
        return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
    for label in ("pretrain", "sft"):
        recs = read(metrics[label])
        axes[0].plot([r["iteration"] for r in recs], [r["train_loss"] for r in recs], label=label)
    axes[0].set(title="AR model loss", xlabel="step")
    grpo = read(metrics["grpo"])
    x = [r["iteration"] for r in grpo]
    for key, label in (("reward_mean", "mean"), ("reward_max", "max")):
        axes[1].plot(x, [r.get(key, float("nan")) for r in grpo], label=label)
    axes[1].set(title="GRPO reward (partial credit)", xlabel="step")
    # entropy and KL come from the kept rows: a step whose groups were all dropped has none (skipped)
    for key, label, scale in (("grpo_entropy", "entropy", 1.0), ("grpo_kl", "KL x 100", 100.0)):
        pts = [(r["iteration"], r[key] * scale) for r in grpo if key in r and not math.isnan(r[key])]
        axes[2].plot([p for p, _ in pts], [v for _, v in pts], marker=".", label=label)
    axes[2].set(title="GRPO entropy and KL (steps that trained)", xlabel="step")
    axes[3].plot(x, [r.get("grpo_dropped_group_share", float("nan")) for r in grpo], label="dropped groups")
    axes[3].plot(x, [r.get("grpo_clip_fraction", float("nan")) for r in grpo], label="clip fraction")
    axes[3].set(title="GRPO dropped-group share, clip fraction", xlabel="step", ylim=(0, 1))
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render(cfg, grid, sft: dict, rl: dict, ceiling: dict, fig: dict, timings: dict, bundle: Path,
           grpo_settings: dict) -> str:
    n = sft["samples_per_prompt"]
    rows = "\n".join(f"| {t} | {v} | {'met' if m else '**missed**'} | {g} |" for t, v, m, g in targets(fig))
    timing = "\n".join(f"| {k} | {v:.0f} |" for k, v in timings.items())
    settings = ", ".join(f"{k}={v}" for k, v in grpo_settings.items())
    return f"""# megatron-xomni tiny pipeline report

Built-in world, {cfg.image_size} px images ({grid.rows}x{grid.cols} image tokens), all on CPU.
Seeds: pipeline {cfg.seed}, evaluation sampling {sft['seed']} (the same held-out prompts and seeds for both policies).
Evaluation: {sft['num_prompts']} held-out prompts x {n} samples (T=1.0, min-p 0.03), each token sequence
decoded with {sft.get('decoder_seeds', 1)} decoder seeds, scored by the world detector.
**Reward** = partial credit (fraction of a prompt's checks passed; the RL reward).
**Accuracy** = GenEval-style all-or-nothing (every check must pass).
The spread over pipeline seeds (`xomni demo --seeds 0,1,2 --publish reports/tiny_demo`) is the last section
when it has been run.
## Targets

| target | measured | | margin |
|---|---|---|---|
{rows}

## Reward: GRPO vs SFT (partial credit)

| policy | mean single-sample | best-of-{n} (naive: picked and scored on one decode) | honest best-of-{n} (picked on decode 0, re-scored with the other, fresh decoder seeds) |
|---|---|---|---|
| SFT | {fig['sft_mean']:.3f} | {fig['sft_best_of_n']:.3f} | {fig['sft_honest_best_of_n']:.3f} |
| GRPO | {fig['grpo_mean']:.3f} | {fig['grpo_best_of_n']:.3f} | {fig['grpo_honest_best_of_n']:.3f} |

The mean is over every decode of every sample. The naive best-of-{n} also selects lucky decoder
noise; the gap between it and the honest figure is that luck.

## Ceiling and headroom

Ceiling: the held-out prompts' ground-truth images through the frozen tokenizer + decoder score
{ceiling['ceiling']:.3f} (partial credit; ground-truth pixels score 1.0). Headroom of the SFT policy
below it: {ceiling['ceiling'] - fig['sft_mean']:+.3f}.

## Noise floor (decoder seeds)

The same token sequences decoded with several decoder seeds; the decoder-seed share of the reward
variance (evaluation/diagnostics.py writes the decomposition down). "One seed per group" is what
GRPO's advantages see with common random numbers (its default).

{_noise_table(sft, rl)}

## Per skill: accuracy (all-or-nothing) before and after RL, partial credit, ceiling

{_skills_table(sft, rl, ceiling)}

## Curves

GRPO settings: {settings}. Entropy and KL are measured on the rows an update used; a step whose
groups all had zero reward variance trains nothing and has no point there.

![curves](curves.png)

## Samples (first column: a ground-truth world image for the prompt; then policy samples, decode 0)

| SFT | GRPO |
|---|---|
| ![sft](eval_sft/samples.png) | ![grpo](eval_grpo/samples.png) |

## Try it

    xomni generate --bundle {_shown(bundle)} --prompt "a photo of two red circles" --size {cfg.image_size}x{cfg.image_size} --out generated

## Wall time per stage (seconds, this machine)

| stage | seconds |
|---|---|
{timing}
| **total** | **{sum(timings.values()):.0f}** |
"""


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it (the committed report holds no home dirs)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def spread(figures: list[dict]) -> dict:
    """{figure: {"mean", "min", "max"}} over runs (NaN-free values only)."""
    out = {}
    for key in figures[0]:
        vals = [f[key] for f in figures if not math.isnan(f[key])]
        out[key] = ({"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)} if vals
                    else {"mean": float("nan"), "min": float("nan"), "max": float("nan")})
    return out


def render_spread(seeds: list[int], figures: list[dict]) -> str:
    s = spread(figures)
    lines = [f"# Spread over pipeline seeds {', '.join(map(str, seeds))}", "",
             "Each seed runs the whole pipeline (`xomni demo --seeds ...`); rewards are partial credit, "
             "accuracy all-or-nothing.", "",
             "| figure | mean | min | max | " + " | ".join(f"seed {x}" for x in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    for key, v in s.items():
        lines.append(f"| {key} | {v['mean']:.3f} | {v['min']:.3f} | {v['max']:.3f} | "
                     + " | ".join(f"{f[key]:.3f}" for f in figures) + " |")
    met = [sum(col) for col in zip(*[[r[2] for r in targets(f)] for f in figures])]
    lines += ["", "| target | seeds met |", "|---|---|"]
    lines += [f"| {t[0]} | {k}/{len(figures)} |" for t, k in zip(targets(figures[0]), met)]
    return "\n".join(lines) + "\n"
