"""One GRPOStep on rollouts of unequal length: this tree vs a peer source tree (e.g. main before the
per-step micro-batch plan), side by side.

    git archive main | tar -x -C /tmp/peer                   # the peer: another checkout's source
    OMP_NUM_THREADS=1 python benchmarks/grpo_microbatch.py --peer-src /tmp/peer

A random X-Omni model (no vision blocks) and a perturbed copy as the reference generate text rollouts
of prompts of 5, 9 and 12 tokens (G per prompt) that stop at an EOS: of the tokens the policy samples,
the one whose first occurrences spread the completion lengths widest. GRPOStep then runs with kl_beta > 0, `--epochs` ppo epochs
and `--minibatches` minibatches of micro-batches of `--micro-batch` rows. Each round starts one worker
process per side (peer first, then this tree; both import only from their own PYTHONPATH), which builds
the same model and rollouts, runs one untimed GRPOStep and times the next (wall and CPU seconds of the
process, `time.process_time`). Prints the median over `--rounds` rounds and the token positions each
side forwards per step (reference pass + every update): whole-step packing forwards every row at the
step's longest rollout. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

PROMPT_LENGTHS = (5, 9, 12)


def _cut_lengths(rollouts, eos: int) -> torch.Tensor:
    """Completion lengths of `rollouts` had they stopped at their first `eos`."""
    out = []
    for r in rollouts:
        hits = (r.tokens[r.prompt_length:] == eos).nonzero()
        out.append(float(hits[0, 0] + 1) if hits.numel() else float(r.num_sampled))
    return torch.tensor(out)


def _worker(args) -> dict:
    from megatron_xomni.inference.generation import RolloutConfig, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel, single_process_env
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer

    torch.set_num_threads(1)
    single_process_env()
    pg = initialize_parallel(ParallelConfig(), seed=0)
    mcfg = XOmniModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
                            num_attention_heads=4, num_query_groups=2, text_vocab_size=512, image_vocab_size=256,
                            image_table_size=320, num_vision_adapter_layers=0, num_vision_head_layers=0,
                            max_position_embeddings=1024)
    models = []
    for extra in (0.0, 0.01):
        chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
        base, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.copy_(torch.randn(p.shape, generator=base) * 0.1 + torch.randn(p.shape, generator=noise) * extra)
        models.append(chunks)
    policy, ref = models
    g = torch.Generator().manual_seed(2)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(args.prompts)]
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in lengths]
    rcfg = RolloutConfig(sampling=SamplingConfig(temperature=1.0), samples_per_prompt=args.group, seed=3)
    ids = list(range(args.prompts))
    probe = generate_text(policy, pg, prompts, args.new_tokens, None, rcfg, prompt_ids=ids)
    eos = max(range(512), key=lambda t: _cut_lengths(probe, t).std().item())  # the widest spread of lengths
    rollouts = generate_text(policy, pg, prompts, args.new_tokens, eos, rcfg, prompt_ids=ids)
    rewards = [((r.sample_id * 37) % 11) / 10.0 for r in rollouts]

    wrapped, opt = wrap_and_build_optimizer(policy, OptimConfig(lr=1e-4, weight_decay=0.0), pg)
    step = GRPOStep(wrapped, opt, pg, GRPOConfig(kl_beta=0.01, ppo_epochs=args.epochs, num_minibatches=args.minibatches,
                                                 micro_batch_size=args.micro_batch), ref_chunks=ref)
    step(rollouts, rewards)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    stats = step(rollouts, rewards)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    longest = max(r.tokens.numel() for r in rollouts) - 1
    n = len(rollouts)
    return {"wall": wall, "cpu": cpu, "time": stats["time"], "rows": n, "step_longest": longest,
            "real_tokens": sum(r.tokens.numel() - 1 for r in rollouts), "num_updates": stats["num_updates"],
            "seq_lengths": sorted({r.tokens.numel() - 1 for r in rollouts}),
            # whole-step packing: the reference pass over all rows, every update over its rows
            "whole_step_tokens": (n + args.epochs * n) * longest,
            **{k: stats[k] for k in ("packed_tokens", "padded_token_share", "padding_saved_share") if k in stats}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-src", required=False, help="source tree of the peer (its megatron_xomni is imported)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = ([("peer", os.path.abspath(args.peer_src))] if args.peer_src else []) + [("this", here)]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--peer-src")
                   and a != args.peer_src]
    runs = {name: [] for name, _ in sides}
    for _ in range(args.rounds):
        for name, src in sides:
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *passthrough], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.split("RESULT ", 1)[1]))
    first = runs["this"][0]
    print(f"{first['rows']} rollouts, sequence lengths {first['seq_lengths']}, step longest {first['step_longest']}; "
          f"{first['num_updates']} updates; {args.rounds} rounds, median")
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        parts = {k: statistics.median(r["time"][k] for r in rs) for k in rs[0]["time"]}
        print(f"{name:5s} GRPOStep wall {wall:.3f} s  cpu {cpu:.3f} s  "
              + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    if "packed_tokens" in first:  # this tree: one plan, forwarded by the reference pass and every update
        passes = 1 + args.epochs
        print(f"positions per step: whole-step packing {first['whole_step_tokens']}, plan "
              f"{passes * first['packed_tokens']} (padded share {first['padded_token_share']:.3f}, "
              f"saved vs packing the forwarded rows to the step's longest {first['padding_saved_share']:.3f}); "
              f"real {passes * first['real_tokens']}")
    if "peer" in runs:
        ratio = statistics.median(r["cpu"] for r in runs["peer"]) / statistics.median(r["cpu"] for r in runs["this"])
        print(f"speed-up (peer / this, CPU s): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
