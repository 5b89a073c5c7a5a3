"""Rollout throughput: the KV-cache controller on megatron-core vs `transformers`' `generate`.

    python benchmarks/rollout_throughput.py                      # CPU defaults (a few seconds per run)
    python benchmarks/rollout_throughput.py --hidden 1024 --layers 8 --batch 16 --new-tokens 256

A random Qwen2 model (HF, eager attention) is converted to the Megatron X-Omni model with no
vision blocks, so on text the two are the same network. Printed side by side, same batch and
prompt:
  - text mode, greedy: our rollout (KV cache) vs `Qwen2ForCausalLM.generate` (KV cache), with
    token agreement as a sanity check;
  - image mode: our rollout sampling grid h*w image codes (min-p 0.03), with the KV cache and with
    full recomputation.
Throughput = generated tokens (all rows) / wall seconds, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def _hf_model(path, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _best(fns, repeats):
    """Best-of-`repeats` seconds per fn, the fns interleaved so that load from other processes on a
    shared machine hits them alike. Returns [(seconds, last output)]."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(best, outs))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096, help="text vocabulary")
    p.add_argument("--image-vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48, help="text mode: tokens generated per row")
    p.add_argument("--grid", type=int, nargs=2, default=(6, 8), help="image mode: h w code grid")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_xomni.parallel import single_process_env

    single_process_env()

    from megatron_xomni.conversion.convert import convert_hf_to_megatron
    from megatron_xomni.inference.generation import RolloutConfig, generate_images, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.models.xomni.checkpoint import load_xomni
    from megatron_xomni.parallel import destroy_parallel

    tmp = tempfile.mkdtemp(prefix="rollout_bench_")
    hf = _hf_model(f"{tmp}/hf", args)
    convert_hf_to_megatron(f"{tmp}/hf", f"{tmp}/mg", vision_layers=(0, 0), image_vocab_size=args.image_vocab,
                           image_table_size=args.image_vocab)
    from megatron.core.process_groups_config import ProcessGroupCollection

    chunks, mcfg = load_xomni(f"{tmp}/mg")  # one process: starts a TP=PP=1 parallel state
    pg = ProcessGroupCollection.use_mpu_process_groups()

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g)
    rows = [r.tolist() for r in prompt]
    greedy = RolloutConfig(sampling=SamplingConfig(temperature=0.0), samples_per_prompt=1,
                           max_rows_per_forward=args.batch)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               pad_token_id=0, eos_token_id=None)

    h, w = args.grid
    img_cfg = RolloutConfig(sampling=SamplingConfig(), samples_per_prompt=1, max_rows_per_forward=args.batch)
    no_cache = RolloutConfig(sampling=SamplingConfig(), samples_per_prompt=1, max_rows_per_forward=args.batch,
                             use_kv_cache=False)
    (t_ours, ours), (t_hf, hf_out), (t_img, _), (t_img_nc, _) = _best([
        lambda: generate_text(chunks, pg, rows, args.new_tokens, None, greedy),
        hf_generate,
        lambda: generate_images(chunks, pg, rows, (h, w), 0, img_cfg),
        lambda: generate_images(chunks, pg, rows, (h, w), 0, no_cache),
    ], args.repeats)
    ours_tok = torch.stack([r.tokens[args.prompt_len:] for r in ours])
    agree = (ours_tok == hf_out[:, args.prompt_len:]).float().mean().item()
    n_text = args.batch * args.new_tokens
    n_img = args.batch * h * w

    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} + {args.image_vocab} codes; "
          f"batch {args.batch}, prompt {args.prompt_len}, threads {torch.get_num_threads()}")
    print(f"{'run':48s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s}")
    for name, n, t in [
        ("text, greedy: megatron-xomni KV-cache rollout", n_text, t_ours),
        ("text, greedy: transformers Qwen2 generate", n_text, t_hf),
        (f"image {h}x{w}, min-p: KV-cache rollout", n_img, t_img),
        (f"image {h}x{w}, min-p: full recomputation", n_img, t_img_nc),
    ]:
        print(f"{name:48s} {n:7d} {t:8.3f} {n / t:9.1f}")
    print(f"greedy token agreement with transformers: {agree:.4f}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
