"""Where a decode step's time goes: the megatron-core KV-cache rollout vs the lean decode path.

    python benchmarks/rollout_profile.py --threads 1                      # config 1 (hidden 256, batch 8)
    python benchmarks/rollout_profile.py --threads 1 --hidden 512 --batch 16

The model of `rollout_throughput.py` (random Qwen2 converted, no vision blocks). For the
reference path, the parts of one decode forward are timed with torch.profiler `record_function`
scopes wrapped (here only) around megatron-core's functions: the linear layers (column/row
parallel, with their autograd Functions and TP-region mappings), RoPE, the KV-cache
bookkeeping, core attention, the norms, the embedding and the head's image mask/gather; the
rest of the forward (module calls, layer/block glue, bias-dropout-add, Python) is the
remainder. The cost of megatron_xomni's CPU TorchFunctionMode is measured A/B (step time with
and without it), the sampling/controller cost as generate_text's time per token minus the
forward's. CPU seconds of this process (`time.process_time`) over `--steps` decode steps,
median of `--repeats`; the profiler's own overhead is scaled out (the categories are shares of
the profiled total, applied to the unprofiled step time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


_LABELS: set[str] = set()


def _wrap(owner, name, label):
    """Replace owner.name by a version that runs inside a record_function(label) scope."""
    fn = getattr(owner, name)
    _LABELS.add(label)

    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)

    setattr(owner, name, wrapped)


def _instrument():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import attention

    from megatron_xomni.models.xomni import attention as sdpa, model, norm

    _wrap(layers.ColumnParallelLinear, "forward", "linear layers + heads (matmul, autograd Fn, TP mappings)")
    _wrap(layers.RowParallelLinear, "forward", "linear layers + heads (matmul, autograd Fn, TP mappings)")
    _wrap(attention, "apply_rotary_pos_emb", "RoPE (re-applied to every cached key)")
    _wrap(attention.Attention, "_adjust_key_value_for_inference", "KV-cache bookkeeping")
    _wrap(sdpa.SDPAttention, "forward", "core attention (SDPA + layout)")
    _wrap(norm.RMSNorm, "forward", "RMSNorm")
    _wrap(model.XOmniModel, "_embed", "embedding (text + image tables)")
    _wrap(tensor_parallel, "gather_from_tensor_model_parallel_region", "head logits gather (no-op at TP=1)")


def _cpu(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--image-vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_xomni.parallel import single_process_env

    single_process_env()
    from benchmarks.rollout_throughput import _hf_model, _megatron_policy
    from megatron_xomni import cpu_compat
    from megatron_xomni.inference.decode import DecodeEngine
    from megatron_xomni.parallel import destroy_parallel
    from megatron_xomni.inference.generation import PipelineRunner, RolloutConfig, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig

    tmp = tempfile.mkdtemp(prefix="rollout_profile_")
    _hf_model(f"{tmp}/hf", args)
    pg, chunks = _megatron_policy(f"{tmp}/hf", f"{tmp}/mg", args)
    for c in chunks:
        c.eval()
    B, P, N = args.batch, args.prompt_len, args.steps
    prompt = torch.randint(0, args.vocab, (B, P), generator=torch.Generator().manual_seed(0))
    tok = prompt[:, -1:]

    runner = PipelineRunner(chunks, pg)

    def ref_prefill():
        t0 = time.process_time()
        runner.forward(prompt, runner.new_contexts(B, P + N + 1), 0)
        return time.process_time() - t0

    def ref_steps(clock=time.process_time):  # prefill untimed, then N decode forwards
        ctx = runner.new_contexts(B, P + N + 1)
        runner.forward(prompt, ctx, 0)
        t0 = clock()
        for i in range(N):
            runner.forward(tok, ctx, P + i)
        return (clock() - t0) / N

    engine = DecodeEngine(chunks, pg)

    def fast_steps():
        with torch.no_grad(), cpu_compat.suspended():
            engine.allocate(B, P + N + 1)
            engine.forward(prompt, [(0, B, 0)], torch.zeros(B, dtype=torch.long), None, "text")
            t0 = time.process_time()
            for i in range(N):
                engine.forward(tok, [(0, B, P + i)], torch.full((B,), P + i), "text", "text")
            return (time.process_time() - t0) / N

    def rollout(fast):
        cfg = RolloutConfig(sampling=SamplingConfig(temperature=0.0), samples_per_prompt=1, max_rows_per_forward=B,
                            fast=fast)
        return lambda: generate_text(chunks, pg, [r.tolist() for r in prompt], N, None, cfg)

    for f in (ref_steps, fast_steps, rollout(False), rollout(True)):
        f()  # warm-up
    # Interleaved rounds (load from other processes hits every measurement alike), medians.
    def suspended(fn):
        def run():
            with cpu_compat.suspended():
                return fn()
        return run

    meas = {"on": ref_steps, "off": suspended(ref_steps), "fast": fast_steps, "pre": ref_prefill,
            "gen": lambda: _cpu(rollout(False), 1) / N, "fast_gen": lambda: _cpu(rollout(True), 1) / N}
    vals = {k: [] for k in meas}
    for _ in range(args.repeats):
        for k, fn in meas.items():
            vals[k].append(fn())
    ref_on, ref_off, fast, ref_gen, fast_gen = (statistics.median(vals[k]) for k in ("on", "off", "fast", "gen", "fast_gen"))
    ref_pre = statistics.median(vals["pre"]) / N

    # Categories of the reference forward (mode suspended: its cost is the A/B row).
    _instrument()
    with cpu_compat.suspended(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_step = ref_steps(time.perf_counter)  # the profiler's clock is wall time
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
    scopes = {e.key: e.cpu_time_total for e in events if e.key in _LABELS}
    # Profiled microseconds over N steps -> seconds of an unprofiled step (the profiler slows every op
    # alike); what no scope holds (Python between ops, glue) is the unprofiled step minus the scopes.
    scale = ref_off / (profiled_step * N) * 1e-6
    lin = "linear layers + heads (matmul, autograd Fn, TP mappings)"
    parts = [("CPU-compat TorchFunctionMode on every op (A/B)", ref_on - ref_off)]
    for key in sorted(scopes, key=lambda k: -scopes[k]):
        parts.append((key, scopes[key] * scale))
        if key == lin:
            parts.append(("  of which the matmul kernels (aten::mm)", mm * scale))
    parts.append(("rest: module calls, layer glue, MLP activation, bias-dropout-add, Python",
                  ref_off - sum(scopes.values()) * scale))
    parts.append(("prompt prefill (one forward, spread over the decode steps)", ref_pre))
    parts.append(("sampling + controller (the rest of generate_text)", ref_gen - ref_on - ref_pre))

    print(f"model: hidden {args.hidden}, {args.layers} layers, batch {B}, prompt {P}, {N} decode steps, "
          f"threads {torch.get_num_threads()}; CPU ms per generated token (all rows), median of {args.repeats}")
    print(f"{'megatron-core KV-cache rollout (reference)':72s} {'ms':>7s} {'%':>6s}")
    for name, t in parts:
        print(f"  {name:70s} {t * 1e3:7.3f} {100 * t / ref_gen:5.1f}%")
    print(f"  {'total: generate_text CPU time per decode step':70s} {ref_gen * 1e3:7.3f}")
    print(f"lean decode path: forward {fast * 1e3:.3f} ms, generate_text per decode step {fast_gen * 1e3:.3f} ms "
          f"({ref_gen / fast_gen:.2f}x less than the reference)")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
