"""The tiny end-to-end X-Omni pipeline on CPU: the README's main job (`make demo`).

corpus -> text tokenizer -> image tokenizer (LLaVA-style) -> tokenize -> pre-train -> SFT ->
diffusion decoder -> evaluate (SFT) -> GRPO -> evaluate (GRPO) -> report.

Every stage writes into `<out>/<stage>/` and finishes by writing `<out>/<stage>/DONE.json`
(its wall time and outputs). A rerun skips finished stages, and the training stages resume
from their own checkpoints, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class DemoConfig:
    """Sizes of the tiny pipeline (defaults: the full demo; `smoke()` shrinks it for CI)."""

    out: str = "runs/demo"
    """Output folder (everything the demo writes lives here)."""
    seed: int = 0
    """Seed of data generation and every stage."""
    image_size: int = 64
    """Pixels per side (64 px = 8x8 = 64 image tokens with the tiny tokenizer's patch 8)."""
    corpus_samples: int = 6000
    """Built-in world images in the training corpus."""
    contrastive_steps: int = 300
    """SigLIP contrastive pre-training steps of the tokenizer's ViT (128 images each)."""
    tokenizer_steps: int = 1000
    """LLaVA-style image tokenizer training steps."""
    probe_train: int = 1500
    """World images the tokenizer-health linear probes are fitted on (held-out test: probe_test)."""
    probe_test: int = 300
    ceiling_seeds: int = 4
    """Decoder seeds per held-out prompt in the rendering ceiling (eval_per_skill prompts per skill)."""
    pt_iters: int = 600
    """Pre-training steps of the AR model."""
    sft_iters: int = 150
    """SFT steps."""
    decoder_steps: int = 2400
    """Diffusion decoder training steps."""
    vae_fit_steps: int = 1500
    """Reconstruction steps of the tiny VAE before decoder training."""
    decoder_sample_steps: int = 8
    """Euler steps when decoding images."""
    grpo_steps: int = 80
    """GRPO steps (80 x 64 rollouts: ~50 s here; at 40 steps and lr 1e-4 the reward stalled at 0.25,
    level with SFT's honest best-of-16, measured 2026-12-01)."""
    grpo_prompts: int = 8
    """Prompts per GRPO step."""
    grpo_group: int = 8
    """Samples per prompt (G)."""
    grpo_lr: float = 3e-4
    """GRPO learning rate (constant)."""
    grpo_kl_beta: float = 0.01
    """Weight of the k3 KL penalty to the SFT reference."""
    grpo_shared_decoder_seed: bool = True
    """One decoder seed per group (common random numbers: decoder noise stays out of the advantage)."""
    grpo_reward_decodes: int = 1
    """Decodes per rollout whose rewards are averaged."""
    eval_per_skill: int = 8
    """Held-out prompts per skill in each evaluation (6 skills: 48 prompts)."""
    eval_samples: int = 16
    """Images per evaluation prompt (best-of-N uses all of them)."""
    eval_decoder_seeds: int = 4
    """Decodes of every evaluated token sequence (the noise floor; >= 2 for the honest best-of-N)."""
    ranks: int = 2
    """Data-parallel CPU ranks of the AR training stages."""

    @classmethod
    def smoke(cls, out: str) -> "DemoConfig":
        return cls(out=out, corpus_samples=600, contrastive_steps=10, tokenizer_steps=60, probe_train=300, probe_test=60,
                   ceiling_seeds=2, pt_iters=20, sft_iters=10, decoder_steps=60, vae_fit_steps=100,
                   grpo_steps=2, grpo_prompts=2, grpo_group=4, eval_per_skill=1, eval_samples=2, eval_decoder_seeds=2)


class Stage:
    def __init__(self, name: str, fn: Callable[["DemoContext"], dict]):
        self.name, self.fn = name, fn


class DemoContext:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.timings: dict[str, float] = {}

    def dir(self, stage: str) -> Path:
        d = self.out / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, stage: str) -> dict | None:
        p = self.out / stage / "DONE.json"
        return json.loads(p.read_text()) if p.exists() else None

    def log(self, msg: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run(self, cmd: list[str], log_name: str, env: dict | None = None) -> None:
        """A subprocess whose output goes to the console and to <out>/logs/<log_name>.log."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
        with open(logs / f"{log_name}.log", "a") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
            for line in proc.stdout:
                f.write(line)
                if not line.startswith(("  ", "{", "}", "/")) and "warn" not in line.lower():
                    print("    " + line.rstrip(), flush=True)
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"{log_name} failed with exit code {code}: see {logs / (log_name + '.log')}")

    def torchrun(self, recipe: str, overrides: list[str], log_name: str) -> None:
        from megatron_xomni.parallel.init import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.cfg.ranks}",
               f"--master-port={free_port()}", "-m", "megatron_xomni.train",
               recipe, *overrides]
        self.run(cmd, log_name)


def run_demo(cfg: DemoConfig, stages: list[Stage]) -> Path:
    ctx = DemoContext(cfg)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        prev = ctx.done(stage.name)
        if prev is not None:
            ctx.timings[stage.name] = prev["seconds"]
            ctx.log(f"[{i}/{len(stages)}] {stage.name}: already done ({prev['seconds']:.0f}s), skipping")
            continue
        ctx.log(f"[{i}/{len(stages)}] {stage.name} ...")
        t0 = time.perf_counter()
        result = stage.fn(ctx) or {}
        seconds = time.perf_counter() - t0
        ctx.timings[stage.name] = seconds
        (ctx.dir(stage.name) / "DONE.json").write_text(json.dumps({"seconds": seconds, **result}, indent=2, default=str))
        ctx.log(f"[{i}/{len(stages)}] {stage.name}: done in {seconds:.0f}s")
    ctx.log(f"all stages done in {time.perf_counter() - t_all:.0f}s this run; report: {ctx.out / 'report.md'}")
    return ctx.out / "report.md"
