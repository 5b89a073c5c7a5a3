"""Custom kernels, each only where a benchmark showed the library path is the bottleneck.

- `small_gemm`: fp32 x @ w.T for few rows (a decode step) on AVX-512 CPUs, reading the parameter
  where it is (oneDNN reorders the whole weight on every call; MKL takes its AVX2 path on AMD).
- `decode_attention`: a decode step's RoPE, KV-cache writes and attention in one call per layer
  (as torch ops they were a quarter of a small model's step; SDPA's CPU flash kernel reads a cache
  pushed out of L3 at a third of the stream rate).
- `build`: compiles and loads them (once per machine, cached), and switches them off.
Both are used by the lean decode path (`inference/decode.py`); benchmarks/RESULTS.md has the figures.

Everything else fused comes from a maintained library chosen at run time: attention from
Transformer Engine (TE spec, GPU) or torch's `scaled_dot_product_attention`; norms, bias-SwiGLU,
bias-dropout-add, RoPE and wgrad accumulation from TE / megatron-core fusions; FP8 from TE.
"""
