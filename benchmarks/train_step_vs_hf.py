#!/usr/bin/env python
"""Training-step throughput: this stack (megatron-core, local spec) vs transformers' Qwen2.

Same Qwen-style config, same batch, same CPU threads, in one process, interleaved rounds.
A step = forward + backward + AdamW update. Three runs:
  - megatron-xomni as built (on CPU its linears' fp32 GEMMs run on oneDNN, models/xomni/cpu_linear.py);
  - megatron-xomni with that route off (megatron-core's torch.matmul, i.e. MKL, the kernel
    transformers uses too): the same-kernel comparison;
  - transformers' Qwen2ForCausalLM (sdpa attention by default).
Prints the median over rounds of ms/step in wall and CPU seconds (this process; leaves out time
the scheduler gives to other jobs), tokens/s and the ratios. `--profile` adds torch.profiler's
top operators of one step of each run.

  OMP_NUM_THREADS=1 python benchmarks/train_step_vs_hf.py --layers 4 --hidden 512 --seq 512 --batch 4
"""

import argparse
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--profile", action="store_true", help="print the top operators of one step of each run")
    args = p.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer, zero_grads
    from megatron_xomni.training.step import forward_backward

    from megatron_xomni.parallel import single_process_env

    single_process_env()
    mcfg = XOmniModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                            num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                            text_vocab_size=args.vocab, image_vocab_size=64, image_table_size=64,
                            num_vision_adapter_layers=0, num_vision_head_layers=0,
                            max_position_embeddings=args.seq)
    pg = initialize_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
    wrapped, opt = wrap_and_build_optimizer(chunks, OptimConfig(lr=1e-4, weight_decay=0.0, clip_grad=0.0), pg)

    hf_cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    hf_cfg._attn_implementation = args.hf_attn
    hf = Qwen2ForCausalLM(hf_cfg).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(args.batch, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.batch, -1)}

    def ours():
        zero_grads(wrapped, opt)
        forward_backward(wrapped, [batch], args.vocab, pg)
        opt.step()

    def theirs():
        hf_opt.zero_grad(set_to_none=True)
        out = hf(input_ids=batch["tokens"], labels=ids[:, :-1])  # HF shifts labels internally
        out.loss.backward()
        hf_opt.step()

    from megatron_xomni.models.xomni import cpu_linear

    def ours_mkl():
        cpu_linear.set_enabled(False)
        try:
            ours()
        finally:
            cpu_linear.set_enabled(True)

    runs = [("megatron-xomni", ours), ("megatron-xomni, MKL", ours_mkl), ("transformers", theirs)]
    for _, fn in runs:  # warm-up
        fn()
    wall = {name: [] for name, _ in runs}
    cpu = {name: [] for name, _ in runs}
    for _ in range(args.rounds):
        for name, fn in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            wall[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    tokens = args.batch * args.seq
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, "
          f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"HF attn {args.hf_attn}; median of {args.rounds} rounds x {args.steps} steps")
    for k in w:
        print(f"{k:>20}: {w[k] * 1000:8.1f} ms/step ({c[k] * 1000:8.1f} CPU ms)  {tokens / w[k]:8.0f} tokens/s "
              f"({tokens / c[k]:8.0f} per CPU s)")
    hf_w, hf_c = w["transformers"], c["transformers"]
    for k in ("megatron-xomni", "megatron-xomni, MKL"):
        print(f"ratio ({k} / transformers tokens/s): {hf_w / w[k]:.3f}x wall, {hf_c / c[k]:.3f}x CPU seconds")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in runs:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n== {name}: one step, top operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    destroy_parallel()


if __name__ == "__main__":
    main()
