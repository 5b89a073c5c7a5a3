"""Rollout throughput: the lean decode path and the megatron-core KV-cache path vs `transformers`' `generate`.

    python benchmarks/rollout_throughput.py --threads 1                                    # config 1
    python benchmarks/rollout_throughput.py --threads 1 --hidden 512 --batch 16 --new-tokens 64 --grid 8 8

A random Qwen2 model is converted to the Megatron X-Omni model with no
vision blocks, so on text the two are the same network. The image-mode peer is a Qwen2 with the
X-Omni export's weights (`convert_megatron_to_hf(layout="xomni")`): embedding and head rows are
the text rows followed by the image rows, the image norm equals the text norm (the converter
copies it), so it is the same network over the joint vocabulary; a logits processor masks
everything but the image codes, as a transformers user of X-Omni would sample codes.

Side by side, same batch and prompt, interleaved rounds (load from other processes hits all
alike); each row is the median over `--repeats` rounds after one untimed warm-up round, in wall and
in CPU seconds of this process (the latter leaves out time the scheduler gives to other processes):
  - text, greedy: fast path / megatron-core KV-cache path / `Qwen2ForCausalLM.generate` with eager
    and with sdpa attention (ratios use the faster of the two);
  - image h*w codes, min-p 0.03 at T=1: fast / megatron-core / generate + image-code mask (eager, sdpa);
  - image with CFG (scale 3): fast / megatron-core (transformers has no batched peer for it);
  - text and image: the fast path with its kernels switched off (`kernels.build.disabled()`:
    oneDNN / MKL linears, tensor-op RoPE and SDPA), to show what the kernels add.
The fast path compiles nothing (no torch.compile), so the warm-up round hides no compile time.
transformers runs with megatron_xomni's CPU TorchFunctionMode suspended (its native speed).
Throughput = generated tokens (all rows) / seconds. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
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


def _megatron_policy(hf_dir, out, args):
    """The HF model converted with no vision blocks and loaded at TP=1: (process groups, chunks)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_xomni.conversion.convert import convert_hf_to_megatron
    from megatron_xomni.models.xomni.checkpoint import load_xomni

    convert_hf_to_megatron(hf_dir, out, vision_layers=(0, 0), image_vocab_size=args.image_vocab,
                           image_table_size=args.image_vocab)
    chunks, _ = load_xomni(out)  # one process: starts a TP=PP=1 parallel state
    return ProcessGroupCollection.use_mpu_process_groups(), chunks


def _hf_joint_vocab_model(xomni_dir, text_cfg):
    """Qwen2 over text + image ids from an X-Omni HF export with no vision blocks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_xomni.conversion.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(xomni_dir)
    st = {name: reader.get(name) for name in reader.names_by_shard()}
    if not torch.equal(st["model.lm_norm.weight"], st["model.mm_norm.weight"]):
        raise SystemExit("the image norm differs from the text norm: a Qwen2 peer cannot express it")
    embed = torch.cat([st.pop("model.lm_embed_tokens.weight"), st.pop("model.mm_embed_tokens.weight")])
    head = torch.cat([st.pop("lm_head.weight"), st.pop("mm_head.weight")])
    st["model.embed_tokens.weight"], st["lm_head.weight"] = embed, head
    st["model.norm.weight"] = st.pop("model.lm_norm.weight")
    st.pop("model.mm_norm.weight")
    cfg = Qwen2Config(**{**text_cfg.to_dict(), "vocab_size": embed.shape[0]})
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(st, strict=True)
    return model


def _median_times(fns, repeats):
    """Median wall and CPU seconds per fn over `repeats` interleaved rounds after an untimed warm-up.

    CPU seconds (this process, `time.process_time`) leave out the time the scheduler gives to
    other processes on a shared machine; every run here is single-threaded.
    """
    wall, cpu, outs = [[] for _ in fns], [[] for _ in fns], [None] * len(fns)
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[i] = fn()
            if r:
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu], outs


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
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-cfg", action="store_true", help="skip the classifier-free guidance rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_xomni.parallel import single_process_env

    single_process_env()

    from transformers import LogitsProcessor, LogitsProcessorList

    from megatron_xomni import cpu_compat
    from megatron_xomni.conversion.convert import convert_megatron_to_hf
    from megatron_xomni.inference.generation import RolloutConfig, generate_images, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.kernels import build, decode_attention, small_gemm
    from megatron_xomni.parallel import destroy_parallel

    tmp = tempfile.mkdtemp(prefix="rollout_bench_")
    hf = _hf_model(f"{tmp}/hf", args)
    pg, chunks = _megatron_policy(f"{tmp}/hf", f"{tmp}/mg", args)
    convert_megatron_to_hf(f"{tmp}/mg", f"{tmp}/xomni_hf", layout="xomni")
    hf_joint = _hf_joint_vocab_model(f"{tmp}/xomni_hf", hf.config)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=g)
    rows = [r.tolist() for r in prompt]
    h, w = args.grid
    V, codes = args.vocab, args.image_vocab

    def cfg(fast, sampling, **kw):
        return RolloutConfig(sampling=sampling, samples_per_prompt=1, max_rows_per_forward=args.batch, fast=fast, **kw)

    greedy, minp = SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0, min_p=0.03)

    class ImageCodesOnly(LogitsProcessor):
        """Every id but the image codes V .. V+codes-1 at -inf."""

        def __call__(self, input_ids, scores):
            scores[:, :V] = float("-inf")
            scores[:, V + codes:] = float("-inf")
            return scores

    def with_attention(model, impl, fn):
        """Run fn with the HF model's attention implementation set to `impl` (eager or sdpa)."""
        def run():
            saved = model.config._attn_implementation
            model.config._attn_implementation = impl
            try:
                with torch.no_grad(), cpu_compat.suspended():
                    return fn()
            finally:
                model.config._attn_implementation = saved
        return run

    def hf_text():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           pad_token_id=0, eos_token_id=None)

    def hf_image():
        torch.manual_seed(1)
        return hf_joint.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, min_p=0.03,
                                 logits_processor=LogitsProcessorList([ImageCodesOnly()]),
                                 max_new_tokens=h * w, min_new_tokens=h * w, pad_token_id=0, eos_token_id=None)

    uncond = rows[0][-4:]  # any fixed unconditional prefix: only the cost matters here
    runs = [
        ("text, greedy: fast decode path", "text", lambda: generate_text(chunks, pg, rows, args.new_tokens, None, cfg(True, greedy))),
        ("text, greedy: megatron-core KV cache", "text", lambda: generate_text(chunks, pg, rows, args.new_tokens, None, cfg(False, greedy))),
        ("text, greedy: transformers generate (eager)", "text", with_attention(hf, "eager", hf_text)),
        ("text, greedy: transformers generate (sdpa)", "text", with_attention(hf, "sdpa", hf_text)),
        (f"image {h}x{w}, min-p: fast decode path", "image", lambda: generate_images(chunks, pg, rows, (h, w), 0, cfg(True, minp))),
        (f"image {h}x{w}, min-p: megatron-core KV cache", "image", lambda: generate_images(chunks, pg, rows, (h, w), 0, cfg(False, minp))),
        (f"image {h}x{w}, min-p: transformers + mask (eager)", "image", with_attention(hf_joint, "eager", hf_image)),
        (f"image {h}x{w}, min-p: transformers + mask (sdpa)", "image", with_attention(hf_joint, "sdpa", hf_image)),
    ]
    if not args.no_cfg:
        runs += [
            (f"image {h}x{w}, CFG 3: fast decode path", "image", lambda: generate_images(
                chunks, pg, rows, (h, w), 0, cfg(True, minp, cfg_scale=3.0), uncond_prompt=uncond)),
            (f"image {h}x{w}, CFG 3: megatron-core KV cache", "image", lambda: generate_images(
                chunks, pg, rows, (h, w), 0, cfg(False, minp, cfg_scale=3.0), uncond_prompt=uncond)),
        ]
    def without_kernel(fn):
        def run():
            with build.disabled():
                return fn()
        return run

    n_base = len(runs)
    runs += [("text, greedy: fast path, kernels off", "text", without_kernel(runs[0][2])),
             (f"image {h}x{w}, min-p: fast path, kernels off", "image", without_kernel(runs[4][2]))]
    times, cpu, outs = _median_times([r[2] for r in runs], args.repeats)
    n_tok = {"text": args.batch * args.new_tokens, "image": args.batch * h * w}

    def gen(out):
        if isinstance(out, torch.Tensor):
            return out[:, args.prompt_len:]
        return torch.stack([r.tokens[args.prompt_len:args.prompt_len + (h * w if r.codes is not None else args.new_tokens)]
                            for r in out])

    print(f"small_gemm kernel: {small_gemm.why_unavailable() or 'in use (rows <= %d, one thread)' % small_gemm.MAX_ROWS}; "
          f"decode_attention kernel: {decode_attention.why_unavailable() or 'in use (one thread)'}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} + {args.image_vocab} codes; "
          f"batch {args.batch}, prompt {args.prompt_len}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} rounds")
    print(f"{'run':50s} {'tokens':>7s} {'wall s':>8s} {'tokens/s':>9s} {'CPU s':>8s} {'tokens/CPU s':>12s}")
    for (name, mode, _), t, c in zip(runs, times, cpu):
        print(f"{name:50s} {n_tok[mode]:7d} {t:8.3f} {n_tok[mode] / t:9.1f} {c:8.3f} {n_tok[mode] / c:12.1f}")
    # Ratios against the faster transformers attention (the stricter peer), wall | CPU seconds.
    for label, ts in (("wall", times), ("CPU ", cpu)):
        hf_t, hf_i = min(ts[2], ts[3]), min(ts[6], ts[7])
        line = (f"{label}  text: fast / transformers {hf_t / ts[0]:.2f}x, fast / megatron-core {ts[1] / ts[0]:.2f}x, "
                f"megatron-core / transformers {hf_t / ts[1]:.2f}x | image: fast / transformers {hf_i / ts[4]:.2f}x, "
                f"fast / megatron-core {ts[5] / ts[4]:.2f}x, megatron-core / transformers {hf_i / ts[5]:.2f}x")
        print(line + ("" if args.no_cfg else f" | CFG: fast / megatron-core {ts[9] / ts[8]:.2f}x")
              + f" | kernel gain: text {ts[n_base] / ts[0]:.2f}x, image {ts[n_base + 1] / ts[4]:.2f}x")
    agree = lambda a, b: (gen(a) == gen(b)).float().mean().item()
    print(f"greedy token agreement: fast vs transformers {agree(outs[0], outs[2]):.4f}, "
          f"fast vs megatron-core {agree(outs[0], outs[1]):.4f}; image tokens fast vs megatron-core "
          f"{agree(outs[4], outs[5]):.4f}" + ("" if args.no_cfg else f", CFG {agree(outs[8], outs[9]):.4f}"))
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
