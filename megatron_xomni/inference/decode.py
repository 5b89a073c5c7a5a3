"""A lean decode path over the policy's own parameters, in its training layout.

The megatron-core forward with a `StaticInferenceContext` (the reference, `inference/generation.py`) costs
far more per decoded token than its matmuls (profile in benchmarks/RESULTS.md): ~30 modules,
autograd Functions and TP-mapping wrappers per layer, RoPE re-applied to every cached key on
every step, both output heads on every step, the CPU-compat TorchFunctionMode on every op, and a
sampler drawing one random number per row through its own generator. This module runs the same
network with plain tensor ops:

- Weights: the megatron-core modules' own `Parameter` objects, looked up when a generation
  batch starts: no copy, no refit, so an optimizer step (in place) is seen by the next rollout.
  TP shards are used as they are (column-parallel outputs stay sharded; row-parallel outputs and
  the vocab-parallel embedding are all-reduced over `pg.tp`, the head logits all-gathered).
- Static KV caches, preallocated per generation batch as one [rows, groups, max_len, dim] pair
  per layer, keys stored after RoPE (rotated once, not once per later step); RoPE angles come
  from the chunk's own `rotary_pos_emb`. A decode step's RoPE, cache writes and attention are one
  `kernels.decode_attention` call per layer on one CPU thread (tensor ops and SDPA elsewhere).
- Only the head of the mode: the text head in text mode, the first `image_vocab_size` image-head
  rows in image mode (the spare slots the reference masks to -inf are not computed at TP=1).
  Vision blocks are skipped where they cannot matter (text-mode decode: new text positions keep
  the block's input, and no image token follows whose attention would read their keys).
- Classifier-free guidance runs the conditional and unconditional rows as one batch (one weight
  read per step instead of two); only attention is per branch.
- Sampling is fused: every row's uniforms for all steps are drawn up front (`torch.rand(steps)`
  from a generator gives exactly the numbers `steps` single draws give), and min-p and the
  inverse CDF share one softmax.
- PP / VPP: chunks run in pipeline order with hidden states sent between stages per step; the
  last stage samples and broadcasts (token, log-prob) over `pg.pp`, as the reference does.

Network and sampling rules are the reference's: tokens are identical and log-probs agree to float
rounding (`tests/inference/test_decode.py`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.utils import unwrap_model

from megatron_xomni import cpu_compat
from megatron_xomni.inference.cuda_graph import GraphedStep
from megatron_xomni.kernels import decode_attention, small_gemm
from megatron_xomni.models.xomni import cpu_linear
from megatron_xomni.models.xomni.layers import XOmniVisionLayer
from megatron_xomni.models.xomni.norm import RMSNorm

TEXT, IMAGE = "text", "image"

# oneDNN's inner product (the kernel inductor's CPU backend emits for linears) reads the dense
# weight as it is and runs AVX-512 where MKL's sgemm takes slower paths on some CPUs (1.3-2x on
# decode shapes, measured); for tiny products its fixed cost per call (~10 us) loses to MKL.
# It reorders its "weights" operand on every call; with >= 16 rows, swapping the roles (the
# weight as the source, the activations as the small reordered operand) avoids copying the
# weight and measured ~10% less per decode step at hidden 512 (not at input width 1024, nor
# with 8 rows, where the kernel is narrow). A prompt prefill (hundreds of rows) amortises the
# weight's reorder and pays more for transposing the swapped product: 1.2-1.5x slower swapped
# at 128-512 rows, measured, so the swap stops at 64 rows (a decode batch, CFG's doubled rows).
# With at most 32 rows (a decode step; CFG's doubled rows up to batch 16) and one thread,
# `kernels.small_gemm` reads the weight rows in place: its dot-product tiles (<= 8 rows) run at
# 70-80 % of the FMA peak, its broadcast form (9-32 rows) at 85-90 %: 1.05-2x oneDNN's calls on
# decode shapes (benchmarks/RESULTS.md); the oneDNN routes above serve prefills and larger decode
# batches. `cpu_linear.set_enabled(False)` sends every call to F.linear (MKL), as for the training
# linears, and attention to SDPA.


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ b) for 2-D x, reading the parameter tensor as it is (no packed copy is kept)."""
    m = x.shape[0]
    if cpu_linear.enabled():
        y = small_gemm.linear(x, w, b)
        if y is not None:
            return y
    if (not cpu_linear.enabled() or x.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16)
            or m * w.numel() < cpu_linear.MIN_MACS):
        return F.linear(x, w, b)
    if 16 <= m <= 64 and w.shape[1] <= 512 and w.numel() >= 1 << 18:
        y = torch.ops.mkldnn._linear_pointwise(w, x.contiguous(), None, "none", [], "").t().contiguous()
        return y if b is None else y + b
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _rms_norm(module: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm.RMSNorm`'s formula (fp32 statistics, weight in the input dtype) in one kernel."""
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)


def _local_spec(layer) -> bool:
    """The layer layout this path reads: RMSNorm modules of the local spec and a SwiGLU MLP."""
    return (isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.pre_mlp_layernorm, RMSNorm)
            and bool(layer.config.gated_linear_unit))


class _Layer:
    """One transformer layer's parameters (the live `Parameter` objects) and shapes."""

    def __init__(self, layer):
        if not _local_spec(layer):
            raise ValueError(
                f"the fast decode path reads the local layer spec (RMSNorm, SwiGLU), got "
                f"{type(layer.input_layernorm).__name__}: build the model with use_te=False or set "
                f"RolloutConfig.fast=False")
        attn, mlp = layer.self_attention, layer.mlp
        self.vision = isinstance(layer, XOmniVisionLayer)
        self.norm1, self.norm2 = layer.input_layernorm, layer.pre_mlp_layernorm
        self.qkv_w, self.qkv_b = attn.linear_qkv.weight, attn.linear_qkv.bias
        self.proj_w, self.proj_b = attn.linear_proj.weight, attn.linear_proj.bias
        self.fc1_w, self.fc1_b = mlp.linear_fc1.weight, mlp.linear_fc1.bias
        self.fc2_w, self.fc2_b = mlp.linear_fc2.weight, mlp.linear_fc2.bias
        self.groups = attn.num_query_groups_per_partition
        self.per_group = attn.num_attention_heads_per_partition // self.groups
        self.dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        self.act = layer.config.activation_func
        self.ffn = self.fc2_w.shape[1]


class _Chunk:
    """One model chunk (virtual pipeline stage) of this rank, with its KV caches."""

    def __init__(self, model, tp_group):
        self.model = model
        self.cfg = model.model_cfg
        self.tp = tp_group
        self.tp_size = tp_group.size()
        self.layers = [_Layer(layer) for layer in model.decoder.layers]
        self.dtype = model.config.params_dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cos_table = self.ssin_table = None  # [max_len, dim], set with the caches (DecodeEngine.allocate)

    def allocate(self, rows: int, max_len: int, device, zeroed: bool = False) -> None:
        """zeroed: for steps that attend over the whole cache under a mask (a masked position's
        weight is 0, and 0 * NaN from uninitialised memory would still be NaN)."""
        new = torch.zeros if zeroed else torch.empty
        self.k = [new(rows, L.groups, max_len, L.dim, dtype=self.dtype, device=device) for L in self.layers]
        self.v = [new(rows, L.groups, max_len, L.dim, dtype=self.dtype, device=device) for L in self.layers]

    def rope_tables(self, max_len: int):
        """(cos, signed sin) [max_len, dim] with rope(x) = x * cos + roll(x, dim/2) * signed_sin.

        roll(x, dim/2) * [-sin, sin] is megatron's rotate_half(x) * sin element for element.
        """
        freqs = self.model.rotary_pos_emb(max_len).reshape(max_len, -1)
        cos, sin = torch.cos(freqs).to(self.dtype), torch.sin(freqs).to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ---- tensor parallelism ---------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(t, group=self.tp)
        return t

    def _row_parallel(self, x, w, b):
        """Partial products summed over TP, then the bias, as megatron-core's RowParallelLinear."""
        out = self._all_reduce(linear(x, w))
        return out if b is None else out + b

    def _lookup(self, table, ids: torch.Tensor) -> torch.Tensor:
        """VocabParallelEmbedding's local rows (ids outside this rank's range give zeros)."""
        if self.tp_size == 1:
            return F.embedding(ids, table.weight)
        start, end = table.vocab_start_index, table.vocab_end_index
        outside = (ids < start) | (ids >= end)
        out = F.embedding((ids - start).masked_fill(outside, 0), table.weight)
        return out.masked_fill(outside.unsqueeze(-1), 0.0)

    # ---- the forward ----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, modality: Optional[str], image_mask) -> torch.Tensor:
        """[R, n] ids -> [R*n, hidden]; `modality` names the table when every id is of one kind."""
        v = self.cfg.text_vocab_size
        text, image = self.model.embedding.word_embeddings, self.model.image_embedding.word_embeddings
        if modality == TEXT:
            out = self._lookup(text, ids)
        elif modality == IMAGE:
            out = self._lookup(image, ids - v)
        else:
            out = torch.where(image_mask.unsqueeze(-1), self._lookup(image, (ids - v).clamp(min=0)),
                              self._lookup(text, ids.clamp(max=v - 1)))
        return self._all_reduce(out.reshape(-1, out.shape[-1]))

    def _attention(self, li: int, L: _Layer, qkv: torch.Tensor, n: int, segs, cos, ssin) -> torch.Tensor:
        """n > 1 new tokens per row (a prefix): causal within them, after the cached ones."""
        g, G, d = L.groups, L.per_group, L.dim
        rows = qkv.shape[0] // n
        qkv = qkv.view(rows, n, g, G + 2, d)
        qk = qkv[:, :, :, : G + 1]
        qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * ssin  # RoPE on queries and keys at once
        q = qk[:, :, :, :G].reshape(rows, n, g * G, d).transpose(1, 2)  # [rows, heads, n, d]
        k, v = qk[:, :, :, G].transpose(1, 2), qkv[:, :, :, G + 1].transpose(1, 2)  # [rows, groups, n, d]
        outs, row0 = [], segs[0][0]
        for a, b, start in segs:
            end, i, j = start + n, a - row0, b - row0
            kc, vc = self.k[li][a:b], self.v[li][a:b]
            kc[:, :, start:end] = k[i:j]
            vc[:, :, start:end] = v[i:j]
            mask = None
            if start > 0:  # bottom-right aligned causal mask
                mask = torch.ones(n, end, dtype=torch.bool, device=qkv.device).tril(start)
            ctx = F.scaled_dot_product_attention(q[i:j], kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                                 is_causal=start == 0, scale=L.scale, enable_gqa=G > 1)
            outs.append(ctx.transpose(1, 2).reshape((b - a) * n, g * G * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _attention_step(self, li: int, L: _Layer, qkv: torch.Tensor, segs, cos, ssin, pos) -> torch.Tensor:
        """One new token per row (the decode step): the hot path, few tensor ops, no index parsing.

        On one CPU thread in fp32 `kernels.decode_attention` runs all of it in one call per layer
        (RoPE, cache writes, softmax attention over each row's filled prefix); else tensor ops + SDPA."""
        g, G, d = L.groups, L.per_group, L.dim
        rows = qkv.shape[0]
        row0 = segs[0][0]
        if cpu_linear.enabled() and all(segs[i][1] == segs[i + 1][0] for i in range(len(segs) - 1)):
            out = decode_attention.attend_step(qkv, g, G, d, self.cos_table, self.ssin_table, pos,
                                               self.k[li].narrow(0, row0, rows), self.v[li].narrow(0, row0, rows),
                                               L.scale)
            if out is not None:
                return out
        qkv = qkv.view(rows, g, G + 2, d)
        qk = qkv.narrow(2, 0, G + 1)
        qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * ssin  # RoPE on queries and keys at once
        q = qk.narrow(2, 0, G).reshape(rows, g * G, 1, d)
        k, v = qk.select(2, G), qkv.select(2, G + 1)
        kc, vc = self.k[li], self.v[li]
        outs = []
        for a, b, start in segs:
            whole = a == 0 and b == rows == kc.shape[0]
            kseg, vseg = (kc, vc) if whole else (kc.narrow(0, a, b - a), vc.narrow(0, a, b - a))
            i = a - segs[0][0]
            kseg.select(2, start).copy_(k if whole else k.narrow(0, i, b - a))
            vseg.select(2, start).copy_(v if whole else v.narrow(0, i, b - a))
            outs.append(F.scaled_dot_product_attention(
                q if whole else q.narrow(0, i, b - a), kseg.narrow(2, 0, start + 1), vseg.narrow(2, 0, start + 1),
                scale=L.scale, enable_gqa=G > 1))
        ctx = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return ctx.view(rows, g * G * d)

    def _attention_static(self, li: int, L: _Layer, qkv: torch.Tensor, pos, visible, cos, ssin) -> torch.Tensor:
        """The decode step with every shape fixed, for a CUDA graph: each row writes its key and value
        at its own position (`pos` [R], a device tensor) and attends over the whole cache under
        `visible` [R, 1, 1, max_len] (positions up to its own). A KV group's G query heads are the
        G queries of one attention head (no GQA expansion of the cache)."""
        g, G, d = L.groups, L.per_group, L.dim
        rows = qkv.shape[0]
        qkv = qkv.view(rows, g, G + 2, d)
        qk = qkv.narrow(2, 0, G + 1)
        qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * ssin
        slot = pos.view(rows, 1, 1, 1).expand(rows, g, 1, d)
        self.k[li].scatter_(2, slot, qk.narrow(2, G, 1))
        self.v[li].scatter_(2, slot, qkv.narrow(2, G + 1, 1))
        ctx = F.scaled_dot_product_attention(qk.narrow(2, 0, G), self.k[li], self.v[li], attn_mask=visible,
                                             scale=L.scale)
        return ctx.reshape(rows, g * G * d)

    def layers_forward(self, x: torch.Tensor, n: int, segs, cos, ssin, image_mask, run_vision: bool,
                       static=None, pos=None):
        """x [rows*n, hidden] of the cache rows in `segs` through this chunk's layers.

        static: (pos, visible) for a fixed-shape decode step (`_attention_static`), else None;
        pos [rows]: each row's position in a decode step (n == 1)."""
        for li, L in enumerate(self.layers):
            if L.vision and not run_vision:
                continue
            qkv = linear(_rms_norm(L.norm1, x), L.qkv_w, L.qkv_b)
            if static is not None:
                att = self._attention_static(li, L, qkv, *static, cos, ssin)
            elif n == 1:
                att = self._attention_step(li, L, qkv, segs, cos, ssin, pos)
            else:
                att = self._attention(li, L, qkv, n, segs, cos, ssin)
            y = x + self._row_parallel(att, L.proj_w, L.proj_b)
            gu = linear(_rms_norm(L.norm2, y), L.fc1_w, L.fc1_b)
            out = y + self._row_parallel(L.act(gu.narrow(1, 0, L.ffn)) * gu.narrow(1, L.ffn, L.ffn),
                                         L.fc2_w, L.fc2_b)
            if L.vision and image_mask is not None:  # vision blocks update image positions only
                out = torch.where(image_mask.reshape(-1, 1), out, x)
            x = out
        return x

    def head(self, x_last: torch.Tensor, last_is_image, mode: str) -> torch.Tensor:
        """Final norm by the last input token's modality, then the mode's head: [R, V_mode] fp32."""
        norm = self.model.decoder.final_layernorm
        if isinstance(last_is_image, bool):
            h = _rms_norm(norm.image_norm if last_is_image else norm.text_norm, x_last)
        else:
            h = torch.where(last_is_image.unsqueeze(-1), _rms_norm(norm.image_norm, x_last),
                            _rms_norm(norm.text_norm, x_last))
        ivs = self.cfg.image_vocab_size
        if mode == TEXT:
            logits = linear(h, self.model.output_layer.weight)
        else:
            w = self.model.image_output_layer.weight
            logits = linear(h, w[:ivs] if self.tp_size == 1 else w)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits, group=self.tp)
            logits = torch.cat(parts, dim=-1)
            if mode == IMAGE:
                logits = logits[:, :ivs]
        pad = getattr(self.cfg, "text_vocab_padding", 0)
        if mode == TEXT and pad:  # padding rows added on conversion are never sampled (as in the model)
            logits[:, self.cfg.text_vocab_size - pad:] = float("-inf")
        return logits.float()


class DecodeEngine:
    """The lean forward of this rank's chunks in pipeline order, and a generation loop over it."""

    STEPS = ("dynamic", "static", "cuda_graph")

    def __init__(self, chunks: Sequence, pg, steps: str = "dynamic"):
        """steps: how decode steps run. "dynamic" (the default): attention over each row's filled
        cache prefix, positions as Python ints; "static": every shape fixed (`forward_static`),
        eagerly; "cuda_graph": the static step captured once per generation batch and replayed
        (CUDA, one pipeline stage)."""
        if steps not in self.STEPS:
            raise ValueError(f"steps={steps!r}: expected one of {', '.join(self.STEPS)}")
        models = [unwrap_model(c) for c in chunks]
        if models[0].config.sequence_parallel:
            raise ValueError("rollouts need sequence_parallel=False (a decode step has one token): "
                             "build the rollout/training model without sequence parallelism")
        self.pg = pg
        self.chunks = [_Chunk(m, pg.tp) for m in models]
        self.cfg = models[0].model_cfg
        self.hidden = models[0].config.hidden_size
        self.dtype = self.chunks[0].dtype
        self.pp = pg.pp.size()
        self.pp_rank = pg.pp.rank()
        self.pp_ranks = torch.distributed.get_process_group_ranks(pg.pp) if self.pp > 1 else [0]
        self.order = [(v, r) for v in range(len(self.chunks)) for r in range(self.pp)]
        self.device = next(models[0].parameters()).device
        if steps != "dynamic" and (self.pp > 1 or len(self.chunks) > 1):
            raise ValueError(f"steps={steps!r} runs one pipeline stage and one model chunk (PP=1, no VPP): "
                             f"use steps='dynamic' (RolloutConfig.decode_steps='dynamic') with pipeline parallelism")
        if steps == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("steps='cuda_graph' needs the model on a CUDA device: "
                             "set RolloutConfig.decode_steps to 'static' or 'dynamic'")
        self.steps = steps

    @staticmethod
    def supports(chunks: Sequence) -> bool:
        """True when every layer is of the local spec this path reads (RMSNorm modules, SwiGLU).

        Transformer Engine layers fuse the norm into the QKV linear; they run the reference path.
        """
        return all(_local_spec(layer) for c in chunks for layer in unwrap_model(c).decoder.layers)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def allocate(self, rows: int, max_len: int) -> None:
        for c in self.chunks:
            c.allocate(rows, max_len, self.device, zeroed=self.steps != "dynamic")
        self.cos, self.ssin = self.chunks[0].rope_tables(max_len)
        for c in self.chunks:
            c.cos_table, c.ssin_table = self.cos, self.ssin

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, segs, pos: torch.Tensor, modality: Optional[str], mode: str):
        """Forward n new tokens [R, n]; logits [R, V_mode] on the last stage, None elsewhere.

        segs: consecutive (first row, end row, start) ranges of cache rows whose tokens sit at
        positions start..start+n-1 (together the R rows of `tokens`); `pos` [R] holds each row's
        start. `modality` is TEXT/IMAGE when every new token is of that kind, None for a prefix.
        """
        R, n = tokens.shape
        v = self.cfg.text_vocab_size
        # Vision blocks: no mask when every new token is an image token, skipped in text-mode decode.
        run_vision = mode == IMAGE
        image_mask = None
        if modality is None:
            image_mask = tokens >= v
            run_vision = run_vision or bool(image_mask.any())
        elif modality == TEXT and run_vision:
            image_mask = torch.zeros_like(tokens, dtype=torch.bool)
        if n == 1 and len(segs) == 1:  # one position for all rows: a view of the table
            start = segs[0][2]
            cos, ssin = self.cos[start].view(1, 1, 1, -1), self.ssin[start].view(1, 1, 1, -1)
        elif n == 1:  # [R, 1, 1, d] against [R, groups, heads, d]
            cos, ssin = self.cos[pos].view(R, 1, 1, -1), self.ssin[pos].view(R, 1, 1, -1)
        else:  # [R, n, 1, 1, d] against [R, n, groups, heads, d]
            idx = pos.unsqueeze(1) + torch.arange(n, device=tokens.device)
            cos, ssin = self.cos[idx].view(R, n, 1, 1, -1), self.ssin[idx].view(R, n, 1, 1, -1)
        x, out = None, None
        for i, (vi, r) in enumerate(self.order):
            if r != self.pp_rank:
                continue
            chunk = self.chunks[vi]
            if i == 0:
                x = chunk.embed(tokens, modality, image_mask)
            else:
                x = torch.empty(R * n, self.hidden, dtype=self.dtype, device=tokens.device)
                torch.distributed.recv(x, src=self.pp_ranks[self.order[i - 1][1]], group=self.pg.pp)
            x = chunk.layers_forward(x, n, segs, cos, ssin, image_mask, run_vision, pos=pos)
            if i < len(self.order) - 1:
                torch.distributed.send(x, dst=self.pp_ranks[self.order[i + 1][1]], group=self.pg.pp)
            else:
                last = x if n == 1 else x.view(R, n, -1)[:, -1]
                last_is_image = (modality == IMAGE) if modality is not None else tokens[:, -1] >= v
                out = chunk.head(last, last_is_image, mode)
        return out

    @torch.no_grad()
    def forward_static(self, tokens: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        """One decode step [R, 1] -> logits [R, V_mode] with no Python-side shape or position: rows
        at positions `pos` [R] (a device tensor), all of the mode's kind. What `decode_graph` captures.
        One pipeline stage (TP any: its collectives are in the step)."""
        chunk = self.chunks[0]
        R = tokens.shape[0]
        max_len = chunk.k[0].shape[2]
        modality = IMAGE if mode == IMAGE else TEXT
        cos, ssin = self.cos[pos].view(R, 1, 1, -1), self.ssin[pos].view(R, 1, 1, -1)
        visible = (torch.arange(max_len, device=pos.device) <= pos.view(R, 1)).view(R, 1, 1, max_len)
        x = chunk.embed(tokens, modality, None)
        x = chunk.layers_forward(x, 1, None, cos, ssin, None, mode == IMAGE, static=(pos, visible))
        return chunk.head(x, mode == IMAGE, mode)

    def generate(self, prompts: torch.Tensor, generators: list, *, mode: str, steps: int,
                 stop_id: Optional[int], sampling, cfg_scale: float = 1.0,
                 uncond: Optional[torch.Tensor] = None):
        """Generate for equal-length prompts [b, p]: (tokens [b, t], log-probs [b, t], n_sampled [b]).

        The reference controller's contract: `generators` are the rows' sampling streams;
        log-probs are the conditional branch's at temperature 1 over the mode's vocabulary;
        with `stop_id`, finished rows are padded with it and `n_sampled` counts sampled tokens.
        """
        with torch.no_grad(), cpu_compat.suspended():
            return self._generate(prompts, generators, mode, steps, stop_id, sampling, cfg_scale, uncond)

    def _generate(self, prompts, generators, mode, steps, stop_id, sampling, cfg_scale, uncond):
        b, p = prompts.shape
        dev = prompts.device
        pu = 0 if uncond is None else uncond.numel()
        self.allocate(b if uncond is None else 2 * b, max(p, pu) + steps)
        u = None
        if sampling.temperature > 0:
            u = torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generators]).to(dev)
        v = self.cfg.text_vocab_size
        zeros = torch.zeros(b, dtype=torch.long, device=dev)
        # Prefill each branch's prompt at positions 0..len-1, then decode both branches as one batch.
        out = self.forward(prompts, [(0, b, 0)], zeros, None, mode)
        segs, pos, out_u = [(0, b, p)], torch.full((b,), p, dtype=torch.long, device=dev), None
        if uncond is not None:
            out_u = self.forward(uncond.to(dev).unsqueeze(0).expand(b, -1), [(b, 2 * b, 0)], zeros, None, mode)
            segs.append((b, 2 * b, pu))
            pos = torch.cat([pos, torch.full((b,), pu, dtype=torch.long, device=dev)])
        static_fn = lambda tokens, at: self.forward_static(tokens, at, mode)  # noqa: E731
        static_step = static_fn if self.steps == "static" else None  # a GraphedStep once captured
        toks = torch.empty(b, steps, dtype=torch.long, device=dev)
        lps = torch.empty(b, steps, dtype=torch.float32, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        n_sampled = torch.zeros(b, dtype=torch.long, device=dev)
        t = 0
        for t in range(steps):
            choice = lp = None
            if self.is_last_stage:
                cond = out if uncond is None else out[:b]
                guided = cond
                if uncond is not None:
                    unc = out_u if t == 0 else out[b:]
                    guided = unc + cfg_scale * (cond - unc)
                choice = sample(guided, sampling, None if u is None else u[:, t])
                lp = torch.log_softmax(cond, dim=-1).gather(-1, choice.unsqueeze(-1)).view(b)
            if self.pp > 1:  # float64 holds every token id exactly: one broadcast carries both
                packed = torch.empty(b, 2, dtype=torch.float64, device=dev) if choice is None else \
                    torch.stack([choice.double(), lp.double()], dim=1)
                torch.distributed.broadcast(packed, src=self.pp_ranks[-1], group=self.pg.pp)
                choice, lp = packed[:, 0].long(), packed[:, 1].float()
            tok = choice + v if mode == IMAGE else choice
            if stop_id is not None:
                tok = tok.masked_fill(done, stop_id)
                n_sampled += (~done).long()
            toks[:, t], lps[:, t] = tok, lp
            if stop_id is not None:
                done |= tok == stop_id
                if bool(done.all()):
                    break
            if t == steps - 1:
                break
            step_in = (tok if uncond is None else tok.repeat(2)).view(-1, 1)
            if self.steps == "cuda_graph" and static_step is None:
                static_step = GraphedStep(static_fn, step_in, pos)
            if static_step is not None:
                out = static_step(step_in, pos)
            else:
                out = self.forward(step_in, segs, pos, IMAGE if mode == IMAGE else TEXT, mode)
            segs = [(a, c, s + 1) for a, c, s in segs]
            pos += 1
        if stop_id is None:
            n_sampled.fill_(t + 1)
        return toks[:, : t + 1].cpu(), lps[:, : t + 1].cpu(), n_sampled.cpu()


def sample(logits: torch.Tensor, sampling, u: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row of `logits` [b, V] (fp32): greedy at temperature 0, else inverse-CDF.

    The reference sampler's processors in its order (temperature, top-k, top-p, min-p); min-p
    zeroes the dropped tokens' probabilities instead of re-running a softmax over masked logits
    (the same distribution up to rounding: the CDF is searched at u times its total).
    `u` [b] float64 holds each row's uniform for this step.
    """
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    x = logits if sampling.temperature == 1.0 else logits / sampling.temperature
    k = sampling.top_k
    if 0 < k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, k, dim=-1).values[..., -1:], float("-inf"))
    if sampling.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sp = torch.softmax(sorted_x, dim=-1)
        drop = (torch.cumsum(sp, dim=-1) - sp) >= sampling.top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if sampling.min_p > 0.0:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # First index whose cumulative mass exceeds the target: zero-probability tokens never win.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
