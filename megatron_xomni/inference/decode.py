"""A lean decode path over the policy's own parameters, in its training layout.

The megatron-core forward with a `StaticInferenceContext` (the reference, `rl/rollout.py`) costs
far more per decoded token than its matmuls: about 30 modules, autograd Functions and
TP-mapping wrappers per layer, RoPE re-applied to every cached key on every step, the KV cache
written through a dict per layer, both output heads computed on every step, and the sampler
drawing one random number per row through its own generator. This module runs the same
network with plain tensor ops instead:

- Weights: the megatron-core modules' own `Parameter` objects, read at call time: no copy, no
  refit, so an optimizer step (in place) is seen by the next rollout. TP shards are used as
  they are (column-parallel outputs stay sharded; the row-parallel outputs and the
  vocab-parallel embedding are all-reduced over `pg.tp`, the head logits all-gathered).
- Static KV caches, preallocated per generation batch as [layers, rows, groups, max_len, dim],
  keys stored after RoPE (each key is rotated once, not once per later step); RoPE cos/sin
  come from the chunk's own `rotary_pos_emb` table.
- Only the head of the mode is computed: the text head in text mode, the first
  `image_vocab_size` image-head rows in image mode (the spare slots the reference masks to
  -inf are never computed at TP=1). Vision blocks are skipped where they cannot matter (new
  text tokens when no image token can follow: text-mode decode).
- Classifier-free guidance runs the conditional and unconditional rows as one batch (one weight
  read per step instead of two); only attention is per branch.
- Sampling is fused: the uniforms of all steps are drawn up front (`torch.rand(steps)` from a
  row's generator gives exactly the numbers `steps` single draws give), and min-p / the
  inverse-CDF reuse one softmax.
- PP / VPP: chunks run in pipeline order with hidden states sent between stages per step; the
  last stage samples and broadcasts (token, log-prob) over `pg.pp`, as the reference does.

The network and sampling rules are those of the reference; tokens are identical and log-probs
agree to float rounding (`tests/inference/test_decode.py`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.utils import unwrap_model

from megatron_xomni import cpu_compat
from megatron_xomni.models.xomni.layers import XOmniVisionLayer
from megatron_xomni.models.xomni.norm import RMSNorm

TEXT, IMAGE = "text", "image"

# oneDNN's inner product (the kernel inductor's CPU backend emits for linears) on the dense weight:
# AVX-512 where MKL's sgemm takes slower paths on some CPUs; measured 1.2-1.8x on decode shapes.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ b) for 2-D x, reading the parameter tensor as it is (no packed copy is kept)."""
    if _ONEDNN and x.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _check_local_spec(layer) -> None:
    if not (isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.pre_mlp_layernorm, RMSNorm)):
        raise ValueError(
            f"the fast decode path reads the local layer spec (RMSNorm modules), got "
            f"{type(layer.input_layernorm).__name__}: build the model with use_te=False or set "
            f"RolloutConfig.fast=False"
        )


class _Layer:
    """One transformer layer's parameters (live `Parameter` objects) and shapes."""

    def __init__(self, layer):
        _check_local_spec(layer)
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
        if not layer.config.gated_linear_unit:
            raise ValueError("the fast decode path expects a gated MLP (SwiGLU): set RolloutConfig.fast=False")


class _Chunk:
    """One model chunk (virtual pipeline stage) of this rank, with its KV cache."""

    def __init__(self, model, tp_group):
        self.model = model
        self.cfg = model.model_cfg
        self.tp = tp_group
        self.tp_size = tp_group.size()
        self.layers = [_Layer(l) for l in model.decoder.layers]
        self.pre, self.post = model.pre_process, model.post_process
        self.dtype = model.config.params_dtype
        self.k = self.v = None

    # ---- setup per generation batch -------------------------------------------------------
    def allocate(self, rows: int, max_len: int, device) -> None:
        """Static KV caches, one [rows, groups, max_len, dim] pair per layer (keys after RoPE)."""
        self.k, self.v = [], []
        for L in self.layers:
            shape = (rows, L.groups, max_len, L.dim)
            self.k.append(torch.empty(shape, dtype=self.dtype, device=device))
            self.v.append(torch.empty(shape, dtype=self.dtype, device=device))

    def rope_tables(self, max_len: int):
        """(cos, signed sin) [max_len, dim]: x_rot = x * cos + roll(x, dim/2) * signed_sin.

        The angles are the model's own `rotary_pos_emb`; roll(x)·[-sin, sin] equals megatron's
        rotate_half(x)·sin element for element.
        """
        freqs = self.model.rotary_pos_emb(max_len).reshape(max_len, -1)
        cos = torch.cos(freqs).to(self.dtype)
        sin = torch.sin(freqs).to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ---- pieces of the forward -----------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            torch.distributed.all_reduce(t, group=self.tp)
        return t

    def _row_parallel(self, x, w, b):
        """A row-parallel linear: partial products summed over TP, then the bias (as megatron-core)."""
        out = self._all_reduce(linear(x, w))
        return out if b is None else out + b

    def _lookup(self, emb_module, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding lookup of local rows (the caller all-reduces)."""
        w = emb_module.weight
        if self.tp_size == 1:
            return F.embedding(ids, w)
        start, end = emb_module.vocab_start_index, emb_module.vocab_end_index
        outside = (ids < start) | (ids >= end)
        out = F.embedding((ids - start).masked_fill(outside, 0), w)
        return out.masked_fill(outside.unsqueeze(-1), 0.0)

    def embed(self, ids: torch.Tensor, modality: Optional[str], image_mask) -> torch.Tensor:
        """[R, n] ids -> [R*n, hidden]; `modality` names the table when every id is of one kind."""
        v = self.cfg.text_vocab_size
        text_table = self.model.embedding.word_embeddings
        image_table = self.model.image_embedding.word_embeddings
        if modality == TEXT:
            out = self._lookup(text_table, ids)
        elif modality == IMAGE:
            out = self._lookup(image_table, ids - v)
        else:
            text = self._lookup(text_table, ids.clamp(max=v - 1))
            image = self._lookup(image_table, (ids - v).clamp(min=0))
            out = torch.where(image_mask.unsqueeze(-1), image, text)
        return self._all_reduce(out.reshape(-1, out.shape[-1]))

    def _attention(self, li: int, L: _Layer, qkv: torch.Tensor, n: int, segs, cos, ssin) -> torch.Tensor:
        """Self-attention of n new tokens per row; segs are (first row, end row, start position)."""
        g, G, d = L.groups, L.per_group, L.dim
        rows = qkv.shape[0] // n
        qkv = qkv.view(rows, n, g, G + 2, d)
        qk = qkv[:, :, :, : G + 1]
        qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * ssin  # RoPE on queries and keys at once
        q = qk[:, :, :, :G].reshape(rows, n, g * G, d).transpose(1, 2)  # [rows, heads, n, d]
        k = qk[:, :, :, G].transpose(1, 2)  # [rows, groups, n, d]
        v = qkv[:, :, :, G + 1].transpose(1, 2)
        kc, vc = self.k[li], self.v[li]
        whole = len(segs) == 1 and segs[0][0] == 0 and segs[0][1] == kc.shape[0]
        row0 = segs[0][0]
        outs = []
        for a, b, start in segs:
            end = start + n
            kseg = kc if whole else kc[a:b]
            vseg = vc if whole else vc[a:b]
            i, j = a - row0, b - row0
            kseg[:, :, start:end] = k if whole else k[i:j]
            vseg[:, :, start:end] = v if whole else v[i:j]
            mask = None
            if n > 1 and start > 0:  # a chunk after cached tokens: bottom-right aligned causal mask
                mask = torch.ones(n, end, dtype=torch.bool, device=qkv.device).tril(start)
            ctx = F.scaled_dot_product_attention(
                q if whole else q[i:j], kseg[:, :, :end], vseg[:, :, :end], attn_mask=mask,
                is_causal=n > 1 and start == 0, scale=L.scale, enable_gqa=G > 1)
            outs.append(ctx.transpose(1, 2).reshape((b - a) * n, g * G * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def layers_forward(self, x: torch.Tensor, n: int, segs, cos, ssin, image_mask,
                       run_vision: bool) -> torch.Tensor:
        """x [rows*n, hidden] of the cache rows in `segs` through this chunk's layers."""
        hidden = (x.shape[-1],)
        for li, L in enumerate(self.layers):
            if L.vision and not run_vision:
                continue
            # F.rms_norm is RMSNorm's formula (norm.py) in one kernel.
            h = F.rms_norm(x, hidden, L.norm1.weight, L.norm1.eps)
            att = self._attention(li, L, linear(h, L.qkv_w, L.qkv_b), n, segs, cos, ssin)
            y = x + self._row_parallel(att, L.proj_w, L.proj_b)
            h = F.rms_norm(y, hidden, L.norm2.weight, L.norm2.eps)
            gate, up = torch.chunk(linear(h, L.fc1_w, L.fc1_b), 2, dim=-1)
            out = y + self._row_parallel(L.act(gate) * up, L.fc2_w, L.fc2_b)
            if L.vision and image_mask is not None:  # vision blocks update image positions only
                out = torch.where(image_mask.reshape(-1, 1), out, x)
            x = out
        return x

    def head(self, x_last: torch.Tensor, last_is_image, mode: str) -> torch.Tensor:
        """Final norm by the last input token's modality, then the mode's head: [R, V_mode] fp32."""
        norm = self.model.decoder.final_layernorm
        if isinstance(last_is_image, bool):
            h = (norm.image_norm if last_is_image else norm.text_norm).forward(x_last)
        else:
            h = torch.where(last_is_image.unsqueeze(-1), norm.image_norm.forward(x_last),
                            norm.text_norm.forward(x_last))
        ivs = self.cfg.image_vocab_size
        if mode == TEXT:
            logits = linear(h, self.model.output_layer.weight)
        else:
            w = self.model.image_output_layer.weight
            logits = linear(h, w[:ivs] if self.tp_size == 1 else w)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=self.tp)
            logits = torch.cat(parts, dim=-1)
            if mode == IMAGE:
                logits = logits[:, :ivs]
        return logits.float()


class DecodeEngine:
    """The lean forward of this rank's chunks in pipeline order; see the module docstring."""

    def __init__(self, chunks: Sequence, pg):
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

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def allocate(self, rows: int, max_len: int) -> None:
        for c in self.chunks:
            c.allocate(rows, max_len, self.device)
        self.cos, self.ssin = self.chunks[0].rope_tables(max_len)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, segs, pos: torch.Tensor, modality: Optional[str], mode: str):
        """Forward n new tokens [R, n]; logits [R, V_mode] on the last stage.

        segs: consecutive (first row, end row, start) ranges of cache rows whose tokens sit at
        positions start..start+n-1 (together the R rows of `tokens`); `pos` [R] holds every row's start. `modality` is TEXT/IMAGE when every
        new token is of that kind, None for a mixed prefix.
        """
        R, n = tokens.shape
        v = self.cfg.text_vocab_size
        # Vision blocks: kept in full at image positions (no mask needed when all are), skipped when
        # every new token is text in text mode (their keys would only matter to a later image token).
        image_mask = None if modality == IMAGE else tokens >= v
        run_vision = mode == IMAGE or (modality is None and bool(image_mask.any()))
        idx = pos.unsqueeze(1) + torch.arange(n, device=tokens.device) if n > 1 else pos.unsqueeze(1)
        cos = self.cos[idx].view(R, n, 1, 1, -1)
        ssin = self.ssin[idx].view(R, n, 1, 1, -1)
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
            x = chunk.layers_forward(x, n, segs, cos, ssin, image_mask, run_vision)
            if i < len(self.order) - 1:
                torch.distributed.send(x, dst=self.pp_ranks[self.order[i + 1][1]], group=self.pg.pp)
            else:
                last = x.view(R, n, -1)[:, -1]
                last_is_image = (modality == IMAGE) if modality is not None else tokens[:, -1] >= v
                out = chunk.head(last, last_is_image, mode)
        return out

    def broadcast_from_last(self, t: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
        if self.pp == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=self.device)
        torch.distributed.broadcast(t, src=self.pp_ranks[-1], group=self.pg.pp)
        return t

    def generate(self, prompts: torch.Tensor, generators: list, *, mode: str, steps: int,
                 stop_id: Optional[int], sampling, cfg_scale: float = 1.0,
                 uncond: Optional[torch.Tensor] = None):
        """Generate for equal-length prompts [b, p]: (tokens [b, t], log-probs [b, t], n_sampled [b]).

        Same contract as the reference controller: `generators` are the rows' sampling streams,
        log-probs are those of the conditional branch at temperature 1 over the mode's vocabulary.
        """
        with cpu_compat.suspended():
            return self._generate(prompts, generators, mode=mode, steps=steps, stop_id=stop_id,
                                  sampling=sampling, cfg_scale=cfg_scale, uncond=uncond)

    def _generate(self, prompts, generators, *, mode, steps, stop_id, sampling, cfg_scale, uncond):
        b, p = prompts.shape
        pu = 0 if uncond is None else uncond.numel()
        rows = b if uncond is None else 2 * b
        self.allocate(rows, max(p, pu) + steps)
        dev = prompts.device
        u = None
        if sampling.temperature > 0:
            u = torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generators]).to(dev)
        v = self.cfg.text_vocab_size
        tok_mod = IMAGE if mode == IMAGE else TEXT
        # Prefill: each branch's prompt at positions 0..len-1.
        out = self.forward(prompts, [(0, b, 0)], torch.zeros(b, dtype=torch.long, device=dev), None, mode)
        out_u = None
        if uncond is not None:
            rep = uncond.to(dev).unsqueeze(0).expand(b, -1)
            out_u = self.forward(rep, [(b, 2 * b, 0)], torch.zeros(b, dtype=torch.long, device=dev), None, mode)
        segs = [(0, b, p)] if uncond is None else [(0, b, p), (b, 2 * b, pu)]
        pos = torch.full((b,), p, dtype=torch.long, device=dev)
        if uncond is not None:
            pos = torch.cat([pos, torch.full((b,), pu, dtype=torch.long, device=dev)])
        toks = torch.empty(b, steps, dtype=torch.long)
        lps = torch.empty(b, steps, dtype=torch.float32)
        done = torch.zeros(b, dtype=torch.bool)
        n_sampled = torch.zeros(b, dtype=torch.long)
        t = 0
        for t in range(steps):
            packed = None
            if self.is_last_stage:
                cond_logits = out if uncond is None else out[:b]
                if out_u is not None:
                    unc_logits = out_u if t == 0 else out[b:]
                    guided = unc_logits + cfg_scale * (cond_logits - unc_logits)
                else:
                    guided = cond_logits
                choice = sample(guided, sampling, None if u is None else u[:, t])
                lp = torch.log_softmax(cond_logits, dim=-1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)
                packed = torch.stack([choice.double(), lp.double()], dim=1)
            packed = self.broadcast_from_last(packed, (b, 2), torch.float64).cpu()
            choice, lp = packed[:, 0].long(), packed[:, 1].float()
            tok = choice + v if mode == IMAGE else choice
            if stop_id is not None:
                tok = torch.where(done, torch.full_like(tok, stop_id), tok)
            n_sampled += (~done).long()
            toks[:, t], lps[:, t] = tok, lp
            if stop_id is not None:
                done |= tok == stop_id
                if bool(done.all()):
                    break
            if t == steps - 1:
                break
            step_in = tok.to(dev).unsqueeze(1)
            if uncond is not None:
                step_in = torch.cat([step_in, step_in], 0)
            out = self.forward(step_in, segs, pos, tok_mod, mode)
            segs = [(a, c, s + 1) for a, c, s in segs]
            pos = pos + 1
        return toks[:, : t + 1], lps[:, : t + 1], n_sampled


def sample(logits: torch.Tensor, sampling, u: Optional[torch.Tensor]) -> torch.Tensor:
    """One token per row of `logits` [b, V] (fp32): greedy at temperature 0, else inverse-CDF.

    The processors and their order are the reference sampler's (temperature, top-k, top-p,
    min-p); min-p zeroes the dropped tokens' probabilities instead of re-running a softmax over
    masked logits (same distribution up to rounding; the CDF is searched at u times its total).
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
