"""The GPU suite: one script, about 4 minutes on one H200 (`benchmarks/gpu/run.sh` installs the carried
wheels and runs it). `--dry-run` runs the same code on the CPU with tiny sizes (tests/benchmarks).

Sections (each one timed and fenced: an error is recorded and the next section still runs):
  peaks    bf16 8192^3 matmul TFLOP/s (torch.matmul) and device-to-device copy bandwidth (bytes
           read + written): the measured ceilings the other sections are compared with.
  decode   the lean decode path (inference/decode.py) on a ~1B X-Omni model (local spec, bf16):
           one image-mode decode step at batch 64 (the fastest of 3 rollouts at each of two lengths;
           their difference removes the prefill), launched from Python, as fixed-shape steps, and
           captured in a CUDA graph (`inference/cuda_graph.py`; tokens must equal the fixed-shape
           steps'), against the roofline: bytes a step must read
           (every layer's linear weights, the image head's code rows, the KV cache so far) over
           the measured copy bandwidth and over the nominal 4.8 TB/s. Then the peak memory of a
           whole image rollout (`generate_images`, 64 rows, 1024 codes) against weights + KV cache.
  train    bf16 training step (megatron-core schedule, DDP, Megatron optimizer) of the same model
           on mixed text/image sequences: MFU = model FLOPs (models/xomni/flops.py, one head per
           position, causal attention) / step time / peak, against the nominal 989 TFLOP/s and the
           measured matmul peak; also the executed-FLOPs utilisation (both heads, full scores).
  decoder  seconds per 1024 px image of the full-size (FLUX.1-dev) decoder, random bf16 weights,
           28 Euler steps, image variant (benchmarks/decoder_speed.py's measurement).
  te       Transformer Engine parity and FP8 speed-up: only where TE imports (its wheel does not
           fit the 64 MiB carry; the section says so and is skipped).

Timing: CUDA events around the region (after a warm-up), medians; on the CPU, perf_counter.
Output: a table last (what the device tool's reply shows) and a JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

NOMINAL_BF16_TFLOPS = 989.0  # H200 SXM dense bf16, datasheet
NOMINAL_HBM_TBS = 4.8        # H200 HBM3e, datasheet

# ~1B X-Omni: 10 LM + 2 + 2 vision blocks, hidden 2048, GQA 16/4, SwiGLU 5632, 64k text + 16k image codes.
BIG = dict(num_layers=10, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=4,
           text_vocab_size=65536, image_vocab_size=16384, image_table_size=16448, num_vision_adapter_layers=2,
           num_vision_head_layers=2, max_position_embeddings=4096)


def sizes(dry: bool) -> dict:
    """Problem sizes of every section (dry run: tiny, a few seconds on a CPU)."""
    if dry:
        return dict(matmul=256, copy_mib=16, reps=3, model="tiny", batch=4, prompt=8, steps=(4, 24), grid=(3, 3),
                    seq=64, micro_batch=2, micro_batches=2, train_warmup=1, train_steps=2,
                    decoder="tiny", decoder_grid=(4, 4), decoder_steps=2)
    return dict(matmul=8192, copy_mib=4096, reps=20, model="big", batch=64, prompt=32, steps=(32, 160),
                grid=(32, 32), seq=2048, micro_batch=4, micro_batches=2, train_warmup=2, train_steps=5,
                decoder="full", decoder_grid=(64, 64), decoder_steps=28)


class Clock:
    """Median seconds of a callable: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def median(self, fn, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.once(fn) for _ in range(reps))

    def fastest(self, fn, reps: int, warmup: int = 1) -> float:
        """The fastest run: for differences of two timings, robust to a busy host."""
        for _ in range(warmup):
            fn()
        self.sync()
        return min(self.once(fn) for _ in range(reps))


# ---- sections ------------------------------------------------------------------------------------
def section_peaks(ctx) -> dict:
    dev, s, clock = ctx["device"], ctx["sizes"], ctx["clock"]
    n = s["matmul"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)  # random data: zeros run faster
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    t = clock.median(lambda: torch.matmul(a, b), s["reps"], warmup=3)
    elems = s["copy_mib"] * 2 ** 20 // 2
    src = torch.randn(elems, device=dev, dtype=torch.bfloat16, generator=g)
    dst = torch.empty_like(src)
    tc = clock.median(lambda: dst.copy_(src), s["reps"], warmup=3)
    return {"matmul_n": n, "matmul_dtype": str(dtype), "matmul_tflops": 2 * n ** 3 / t / 1e12,
            "copy_bytes": 2 * src.numel() * src.element_size(), "copy_tbs": 2 * src.numel() * src.element_size() / tc / 1e12}


def model_config(ctx):
    from megatron_xomni.models.xomni import XOmniModelConfig, model_preset

    return model_preset("tiny") if ctx["sizes"]["model"] == "tiny" else XOmniModelConfig(**BIG)


def build_chunks(ctx, cfg):
    """The model at TP=PP=1 on the device, local spec, in the suite's dtype."""
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig

    dev = ctx["device"]
    overrides = {"use_cpu_initialization": False} if dev.type == "cuda" else {}
    with torch.device(dev):  # parameters created without a device (our RMSNorm) land on it too
        chunks = build_model_chunks(cfg, ParallelConfig(), ctx["pg"], params_dtype=ctx["dtype"], use_te=False,
                                    **overrides)
    return [c.to(dev) for c in chunks]


def decode_step_bytes(cfg, dtype_bytes: int, rows: int, kv_len: float) -> dict:
    """Bytes one image-mode decode step must read: every layer's linears (vision blocks run in image
    mode), the image head's code rows, and the KV cache of `kv_len` positions (K and V, all layers)."""
    d, kv = cfg.hidden_size, cfg.num_query_groups * cfg.kv_channels
    per_layer = d * (d + 2 * kv) + (d + 2 * kv) + d * d + 2 * d * cfg.ffn_hidden_size + cfg.ffn_hidden_size * d
    weights = cfg.num_layers_total * per_layer + cfg.image_vocab_size * d
    cache = cfg.num_layers_total * 2 * rows * kv_len * kv
    return {"weights": weights * dtype_bytes, "kv_cache": cache * dtype_bytes, "total": (weights + cache) * dtype_bytes}


def section_decode(ctx) -> dict:
    from megatron_xomni.inference.decode import DecodeEngine
    from megatron_xomni.inference.generation import RolloutConfig, generate_images
    from megatron_xomni.inference.sampling import SamplingConfig, sample_generators

    dev, s, clock = ctx["device"], ctx["sizes"], ctx["clock"]
    cfg = ctx["cfg"]
    chunks = ctx["chunks"]
    for c in chunks:
        c.eval()
    rows, p = s["batch"], s["prompt"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.text_vocab_size, (rows, p), generator=g).to(dev)
    sampling = SamplingConfig(temperature=1.0, min_p=0.03)
    short, long_ = s["steps"]
    elem = torch.finfo(ctx["dtype"]).bits // 8
    need = decode_step_bytes(cfg, elem, rows, p + (short + long_) / 2)  # mean cache length of the timed steps
    bw = ctx["peaks"].get("copy_tbs") if ctx.get("peaks") else None
    out = {"rows": rows, "prompt": p, "steps_timed": [short, long_], "bytes": need,
           "roofline_s_measured_bw": need["total"] / (bw * 1e12) if bw else None,
           "roofline_s_nominal_bw": need["total"] / (NOMINAL_HBM_TBS * 1e12)}

    def step_time(kind):
        """Seconds per decode step with DecodeEngine(steps=kind), and the long run's tokens."""
        engine = DecodeEngine(chunks, ctx["pg"], steps=kind)

        def run(steps):
            return lambda: engine.generate(prompts, sample_generators(0, range(rows)), mode="image", steps=steps,
                                           stop_id=None, sampling=sampling)

        t_short = clock.fastest(run(short), reps=3)
        t_long = clock.fastest(run(long_), reps=3)
        return (t_long - t_short) / (long_ - short), run(long_)()[0]

    # The step as Python launches it, then fixed-shape steps eagerly and captured in a CUDA graph
    # (on the CPU dry run the graph is replaced by the eager static step: same code up to capture).
    kinds = [("dynamic", "step_s"), ("static", "step_s_static"),
             ("cuda_graph" if dev.type == "cuda" else "static", "step_s_graph")]
    tokens = {}
    for kind, key in kinds:
        out[key], tokens[key] = step_time(kind)
    # The graph replays the static step's kernels: the same tokens bit for bit.
    out["graph_tokens_equal_static"] = bool(torch.equal(tokens["step_s_graph"], tokens["step_s_static"]))
    out["static_tokens_agree_dynamic"] = (tokens["step_s_static"] == tokens["step_s"]).float().mean().item()
    for key, suffix in (("step_s", ""), ("step_s_graph", "_graph")):
        if out["roofline_s_measured_bw"]:
            out["x_roofline_measured_bw" + suffix] = out[key] / out["roofline_s_measured_bw"]
        out["x_roofline_nominal_bw" + suffix] = out[key] / out["roofline_s_nominal_bw"]

    # Peak memory of a whole image rollout (prefill + h*w codes) against weights + KV cache.
    h, w = s["grid"]
    text_prompts = prompts[:, :p - 4].tolist()
    prefix = [3, 10 + h, 10 + w, 6]  # any <SOM>h w<IMAGE>-shaped prefix: only the shapes matter here
    rcfg = RolloutConfig(sampling=sampling, samples_per_prompt=1, max_rows_per_forward=rows)
    weights = sum(t.numel() * t.element_size() for c in chunks for t in c.parameters())
    kv_full = cfg.num_layers_total * 2 * rows * (p + h * w) * cfg.num_query_groups * cfg.kv_channels * elem
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    rollouts = generate_images(chunks, ctx["pg"], [tp + prefix for tp in text_prompts], (h, w), 4, rcfg)
    clock.sync()
    out["rollout"] = {"rows": rows, "codes": h * w, "seconds": time.perf_counter() - t, "weights_bytes": weights,
                      "kv_cache_bytes": kv_full, "codes_ok": all(r.codes.numel() == h * w for r in rollouts)}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out["rollout"].update(peak_bytes=peak, base_bytes=base, extra_over_kv_bytes=peak - base - kv_full,
                              peak_over_weights_plus_kv=peak / (weights + kv_full))
    return out


def section_train(ctx) -> dict:
    from megatron_xomni.models.xomni.flops import executed_flops, model_flops
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer, zero_grads
    from megatron_xomni.training.step import forward_backward

    s, clock, cfg = ctx["sizes"], ctx["clock"], ctx["cfg"]
    chunks = ctx["chunks"]
    for c in chunks:
        c.train()
    wrapped, opt = wrap_and_build_optimizer(chunks, OptimConfig(lr=1e-5, weight_decay=0.0, clip_grad=1.0), ctx["pg"],
                                            params_dtype=ctx["dtype"])
    seq, mb, n_mb = s["seq"], s["micro_batch"], s["micro_batches"]
    text_len = seq // 4  # X-Omni-style sequences: a caption, then image codes
    g = torch.Generator().manual_seed(1)
    mbs = []
    for _ in range(n_mb):
        text = torch.randint(0, cfg.text_vocab_size, (mb, seq + 1), generator=g)
        image = cfg.text_vocab_size + torch.randint(0, cfg.image_vocab_size, (mb, seq + 1), generator=g)
        ids = torch.where(torch.arange(seq + 1) < text_len, text, image).to(ctx["device"])
        mbs.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": torch.ones(mb, seq, device=ctx["device"]),
                    "position_ids": torch.arange(seq, device=ctx["device"]).expand(mb, seq).contiguous()})

    def step():
        zero_grads(wrapped, opt)
        forward_backward(wrapped, mbs, cfg.text_vocab_size, ctx["pg"])
        opt.step()

    if ctx["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = clock.median(step, reps=s["train_steps"], warmup=s["train_warmup"])
    rows = mb * n_mb
    image_positions = seq - (text_len - 1)  # label positions whose target is an image code
    flops = model_flops(cfg, seq, image_positions=image_positions, batch_size=rows)
    executed = executed_flops(cfg, seq, rows).total
    peak = ctx["peaks"].get("matmul_tflops") if ctx.get("peaks") else None
    out = {"seq": seq, "rows_per_step": rows, "tokens_per_step": rows * seq, "step_s": t,
           "tokens_per_s": rows * seq / t, "model_flops": flops, "executed_flops": executed,
           "achieved_tflops": flops / t / 1e12, "mfu_nominal": flops / t / (NOMINAL_BF16_TFLOPS * 1e12),
           "hfu_executed_nominal": executed / t / (NOMINAL_BF16_TFLOPS * 1e12)}
    if peak:
        out["mfu_measured_peak"] = flops / t / (peak * 1e12)
    if ctx["device"].type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del wrapped, opt
    return out


def section_decoder(ctx) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from decoder_speed import bench_sampling

    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config

    s, dev = ctx["sizes"], ctx["device"]
    if s["decoder"] == "tiny":
        cfg = decoder_config("tiny", "image", adapter_dim=64)
        dec = build_decoder(cfg)
    else:
        cfg = decoder_config("full", "image")
        with torch.device(dev):
            dec = build_decoder(cfg, torch_dtype=torch.bfloat16)
    dec.eval()
    grid, steps = s["decoder_grid"], s["decoder_steps"]
    sec = bench_sampling(dec, grid, steps, batch=1, repeats=1, device=dev, cfg_scale=1.0)
    return {"preset": s["decoder"], "image_px": [grid[0] * 16, grid[1] * 16], "euler_steps": steps,
            "transformer_params": sum(p.numel() for p in dec.transformer.parameters()), "sec_per_image": sec}


TE_NOTE = ("Transformer Engine does not import here. It cannot be carried: the transformer-engine-cu13 2.20.2 "
           "wheel is 276.5 MB against the 64 MiB carry limit, and transformer-engine-torch 2.20.2 is only an "
           "sdist that compiles against the local torch and CUDA (measured 2026-12-01).")


def section_te(ctx) -> dict:
    from megatron_xomni.device import transformer_engine_installed

    if ctx["device"].type != "cuda" or not transformer_engine_installed():
        return {"status": "skipped", "note": TE_NOTE}
    # TE present: logits of the TE spec on the local spec's weights (dist-ckpt maps the fused norm
    # keys), then the bf16 vs FP8 training-step speed of the TE spec.
    import tempfile

    from megatron_xomni.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig
    from megatron_xomni.training.step import forward_logits, load_model_state, model_sharded_state_dict

    cfg, dev, pg = ctx["cfg"], ctx["device"], ctx["pg"]
    root = tempfile.mkdtemp(prefix="te_parity_")
    save_checkpoint(root, 0, model_sharded_state_dict(ctx["chunks"]), {})
    te = build_model_chunks(cfg, ParallelConfig(), pg, params_dtype=ctx["dtype"], use_te=True,
                            use_cpu_initialization=False)
    load_model_state(te, load_checkpoint(resolve_checkpoint(root), model_sharded_state_dict(te)))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.text_vocab_size, (2, 256), generator=g).to(dev)
    mb = {"tokens": ids, "position_ids": torch.arange(256, device=dev).expand(2, 256)}
    a, b = forward_logits(ctx["chunks"], [mb], pg)[0].float(), forward_logits(te, [mb], pg)[0].float()
    finite = torch.isfinite(a)
    rel = ((a[finite] - b[finite]).norm() / a[finite].norm()).item()
    return {"status": "ok", "te_vs_local_logits_rel": rel,
            "note": "FP8 step timing not implemented: add it when a TE build exists on the lent machine"}


SECTIONS = [("peaks", section_peaks), ("decode", section_decode), ("train", section_train),
            ("te", section_te), ("decoder", section_decoder)]


# ---- driver --------------------------------------------------------------------------------------
def _fmt(x, unit="", digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def table(res: dict) -> str:
    p, d, t, dec = (res.get(k, {}) for k in ("peaks", "decode", "train", "decoder"))
    r = d.get("rollout", {})
    gib = 2 ** 30
    lines = [
        f"device: {res['env']['device']}  torch {res['env']['torch']}  dry_run={res['env']['dry_run']}",
        f"peaks   matmul {_fmt(p.get('matmul_tflops'), ' TFLOP/s')} ({p.get('matmul_n')}^3 {p.get('matmul_dtype')}), "
        f"copy {_fmt(p.get('copy_tbs'), ' TB/s')}",
        f"train   {_fmt(t.get('step_s'), ' s/step')}, {_fmt(t.get('tokens_per_s'), ' tok/s')}, "
        f"{_fmt(t.get('achieved_tflops'), ' TFLOP/s')}: MFU {_fmt(t.get('mfu_nominal'))} of nominal "
        f"{NOMINAL_BF16_TFLOPS:.0f}, {_fmt(t.get('mfu_measured_peak'))} of measured peak "
        f"(target >= 0.5 nominal); executed-FLOPs utilisation {_fmt(t.get('hfu_executed_nominal'))}",
        f"decode  batch {d.get('rows')}: {_fmt(None if d.get('step_s') is None else d['step_s'] * 1e3, ' ms/step')} vs "
        f"roofline {_fmt(None if d.get('roofline_s_measured_bw') is None else d['roofline_s_measured_bw'] * 1e3, ' ms')} "
        f"(measured copy bw): {_fmt(d.get('x_roofline_measured_bw'), 'x')}; vs nominal {NOMINAL_HBM_TBS} TB/s: "
        f"{_fmt(d.get('x_roofline_nominal_bw'), 'x')} (target <= 1.5x)",
        f"decode  CUDA graph: {_fmt(None if d.get('step_s_graph') is None else d['step_s_graph'] * 1e3, ' ms/step')} "
        f"(static eager {_fmt(None if d.get('step_s_static') is None else d['step_s_static'] * 1e3, ' ms')}): "
        f"{_fmt(d.get('x_roofline_measured_bw_graph'), 'x')} measured-bw roofline, "
        f"{_fmt(d.get('x_roofline_nominal_bw_graph'), 'x')} nominal; tokens graph == static: "
        f"{d.get('graph_tokens_equal_static')}, static vs dynamic agree {_fmt(d.get('static_tokens_agree_dynamic'))}",
        f"rollout {r.get('rows')} x {r.get('codes')} codes in {_fmt(r.get('seconds'), ' s')}: peak "
        f"{_fmt(None if r.get('peak_bytes') is None else r['peak_bytes'] / gib, ' GiB')} vs weights "
        f"{_fmt(None if r.get('weights_bytes') is None else r['weights_bytes'] / gib, ' GiB')} + KV "
        f"{_fmt(None if r.get('kv_cache_bytes') is None else r['kv_cache_bytes'] / gib, ' GiB')}: "
        f"{_fmt(r.get('peak_over_weights_plus_kv'), 'x')}",
        f"decoder {dec.get('preset')} {dec.get('image_px')} px, {dec.get('euler_steps')} steps: "
        f"{_fmt(dec.get('sec_per_image'), ' s/image')}",
        f"te      {res.get('te', {}).get('status', '-')}: {res.get('te', {}).get('note', res.get('te', {}).get('te_vs_local_logits_rel'))}",
    ]
    for name, _ in SECTIONS:
        sec = res.get(name, {})
        if sec.get("status") == "error":
            lines.append(f"ERROR in {name}: {sec.get('error')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (the CI test)")
    p.add_argument("--out", default=None, help="JSON results file (default $OUT/gpu_suite.json when $OUT is set)")
    p.add_argument("--only", nargs="*", default=None, help=f"sections to run, of {[n for n, _ in SECTIONS]}")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    from megatron_xomni.parallel import ParallelConfig, destroy_parallel, initialize_parallel, single_process_env

    single_process_env()
    t_start = time.perf_counter()
    pg = initialize_parallel(ParallelConfig(), seed=0)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = {"device": dev, "dtype": torch.bfloat16 if cuda else torch.float32, "sizes": sizes(args.dry_run),
           "clock": Clock(dev), "pg": pg}
    res = {"env": {"device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
                   "torch": torch.__version__, "python": platform.python_version(), "dry_run": args.dry_run,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": ctx["sizes"]}}
    try:
        for name, fn in SECTIONS:
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                if name in ("decode", "train", "te") and "chunks" not in ctx:  # one model for the three
                    ctx["cfg"] = model_config(ctx)
                    ctx["chunks"] = build_chunks(ctx, ctx["cfg"])
                if name == "decoder":
                    ctx.pop("chunks", None)
                    if cuda:
                        torch.cuda.empty_cache()
                out = fn(ctx)
                out.setdefault("status", "ok")
            except Exception as e:  # record and go on: one broken section must not cost the lease
                out = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                print(out["traceback"], file=sys.stderr, flush=True)
            out["section_s"] = time.perf_counter() - t0
            res[name] = out
            if name == "peaks" and out["status"] == "ok":
                ctx["peaks"] = out
            print(f"[suite] {name}: {out['status']} in {out['section_s']:.1f} s", flush=True)
    finally:
        destroy_parallel()
    res["env"]["total_s"] = time.perf_counter() - t_start
    path = args.out or (os.path.join(os.environ["OUT"], "gpu_suite.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"total {res['env']['total_s']:.1f} s" + (f"; results in {path}" if path else ""))
    return 0 if all(res.get(n, {}).get("status", "ok") != "error" for n, _ in SECTIONS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
