#!/usr/bin/env python
"""Training-step throughput: this stack (megatron-core, local spec) vs transformers' Qwen2.

Same Qwen-style config, same batch, same CPU threads, in one process, interleaved rounds.
A step = forward + backward + AdamW update. Prints tokens/s for both and the ratio.

  python benchmarks/train_step_vs_hf.py --layers 4 --hidden 512 --seq 512 --batch 4
"""

import argparse
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

    for fn in (ours, theirs):  # warm-up
        fn()
    times = {"megatron-xomni": [], "transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("megatron-xomni", ours), ("transformers", theirs)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    tokens = args.batch * args.seq
    best = {k: min(v) for k, v in times.items()}
    print(f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, ffn {args.ffn}, "
          f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, torch threads {torch.get_num_threads()}, HF attn {args.hf_attn}")
    for k, v in best.items():
        print(f"{k:>16}: {v * 1000:8.1f} ms/step  {tokens / v:10.0f} tokens/s")
    print(f"ratio (megatron-xomni / transformers tokens/s): {best['transformers'] / best['megatron-xomni']:.3f}x")
    destroy_parallel()


if __name__ == "__main__":
    main()
