"""Rollouts from the policy exactly as it is laid out for training (TP, PP, VPP, DP).

A small generation controller over megatron-core's `StaticInferenceContext` (a contiguous KV
cache per layer): one prefill forward over the prompts, then one forward per new token.

- TP: every TP rank runs its shard; the model gathers the last-token logits over TP, so all
  TP peers hold bit-identical logits and, with identical per-sample generators, draw identical
  tokens (no extra collective needed).
- PP / VPP: the model chunks run in pipeline order (virtual stage 0 of every PP rank, then
  virtual stage 1, ...). Hidden states [n, b, hidden] travel with torch.distributed send/recv
  inside `pg.pp`; the last stage samples and broadcasts (token, log-prob) over `pg.pp`, so
  every stage can feed the token in the next step (each stage derives its image-position mask
  from the tokens).
- DP: each DP replica generates its own prompts; pass global `prompt_ids` so a rollout is
  reproducible regardless of how prompts are spread over replicas.

Prompts of unequal length: rows are bucketed by prompt length and each bucket is generated
as its own batch (no padding at all). This is exact for every attention backend, keeps the
training forward free of pad masks, and costs little in GRPO where each prompt already
contributes G rows of equal length.

Log-probs: for every *sampled* token the rollout returns log-softmax of the unmodified
policy's logits at temperature 1 over the mode's vocabulary (image mode: the first
`image_vocab_size` image-head logits; text mode: the text head) of the conditional branch,
i.e. exactly what the training forward (`logprobs.py`) recomputes, independent of
temperature, top-k/top-p/min-p and classifier-free guidance. The appended `<EOM>` is forced,
not sampled, and has no log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_xomni.inference.decode import DecodeEngine
from megatron_xomni.inference.sampling import SamplingConfig, draw, sample_generators, token_logprobs


@dataclass
class RolloutConfig:
    """Generation settings shared by image and text rollouts."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature / top-k / top-p / min-p."""
    samples_per_prompt: int = 16
    """G: samples drawn per prompt (the GRPO group size)."""
    seed: int = 0
    """Base seed; sample j of prompt i uses the stream seeded from (seed, i * G + j)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale s (logits = u + s (c - u)); 1.0 disables it (X-Omni default)."""
    max_rows_per_forward: int = 64
    """At most this many sequences share one generation batch (bounds KV-cache memory)."""
    use_kv_cache: bool = True
    """False re-runs the whole prefix every step (slow; a reference for tests)."""
    fast: bool = True
    """With the KV cache: the lean decode path (`inference/decode.py`) over the same parameters
    (local-spec models; Transformer Engine layers run the reference); False runs megatron-core's
    forward with a StaticInferenceContext (the reference)."""
    decode_steps: str = "dynamic"
    """How the lean decode path runs its steps: "dynamic" (attention over each row's filled cache
    prefix); "static" (every shape fixed: attention over the whole cache under a mask, positions
    on the device; the eager form of the next); "cuda_graph" (the static step captured in a CUDA
    graph once per generation batch and replayed: removes the per-kernel launch cost that
    dominates small-model decode steps on GPU; CUDA, one pipeline stage)."""

    def validate(self) -> None:
        self.sampling.validate()
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 1")
        if self.max_rows_per_forward < 1:
            raise ValueError(f"max_rows_per_forward={self.max_rows_per_forward} must be >= 1")
        if self.decode_steps not in DecodeEngine.STEPS:
            raise ValueError(f"decode_steps={self.decode_steps!r}: expected one of {', '.join(DecodeEngine.STEPS)}")


@dataclass
class Rollout:
    """One sampled sequence."""

    prompt_id: int
    """Global index of the prompt."""
    sample_id: int
    """Global sample id (prompt_id * G + j): names the random stream."""
    tokens: torch.Tensor
    """[L] long: prompt (incl. image prefix) + sampled tokens (+ the forced <EOM> in image mode)."""
    prompt_length: int
    """Number of leading tokens that were given, not sampled."""
    logprobs: torch.Tensor
    """[n_sampled] fp32: log-prob of each sampled token under the unmodified policy (T=1)."""
    codes: Optional[torch.Tensor] = None
    """[h*w] long image codes in raster order (image mode), else None."""

    @property
    def num_sampled(self) -> int:
        return int(self.logprobs.numel())


def _unwrap(m):
    """The XOmniModel inside a megatron-core DDP / Float16Module wrapper."""
    while not hasattr(m, "model_cfg") and hasattr(m, "module"):
        m = m.module
    return m


class PipelineRunner:
    """Runs a forward of new tokens through all pipeline stages; logits on every rank's request.

    `forward` returns the last-position (text, image) logits [b, V], [b, V_img] on the last
    pipeline stage and None elsewhere.
    """

    def __init__(self, chunks: Sequence, pg):
        self.chunks = [_unwrap(c) for c in chunks]
        self.pg = pg
        self.config = self.chunks[0].config
        if self.config.sequence_parallel:
            raise ValueError(
                "rollouts need sequence_parallel=False (a decode step has one token, which cannot be "
                "split over TP ranks): build the rollout/training model without sequence parallelism"
            )
        self.pp = pg.pp.size()
        self.pp_rank = pg.pp.rank()
        self.pp_ranks = torch.distributed.get_process_group_ranks(pg.pp) if self.pp > 1 else [0]
        self.order = [(v, r) for v in range(len(self.chunks)) for r in range(self.pp)]

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def new_contexts(self, batch: int, max_len: int) -> list:
        from megatron.core.inference.contexts import StaticInferenceContext

        return [StaticInferenceContext(batch, max_len) for _ in self.chunks]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, contexts: Optional[list], offset: int):
        """tokens [b, n] at positions offset.. offset+n-1 (n new tokens with a cache, else the prefix)."""
        b, n = tokens.shape
        positions = torch.arange(offset, offset + n, device=tokens.device).expand(b, n)
        hidden, out = None, None
        for idx, (v, r) in enumerate(self.order):
            if r != self.pp_rank:
                continue
            chunk = self.chunks[v]
            if idx > 0:
                hidden = torch.empty(n, b, self.config.hidden_size, dtype=self.config.pipeline_dtype,
                                     device=tokens.device)
                torch.distributed.recv(hidden, src=self.pp_ranks[self.order[idx - 1][1]], group=self.pg.pp)
                chunk.set_input_tensor(hidden)
            ctx = contexts[v] if contexts is not None else None
            result = chunk(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
            if idx < len(self.order) - 1:
                torch.distributed.send(result.contiguous(), dst=self.pp_ranks[self.order[idx + 1][1]],
                                       group=self.pg.pp)
            else:
                text, image = result
                out = (text[:, -1].float(), image[:, -1].float())
        if contexts is not None:
            for ctx in contexts:
                ctx.sequence_len_offset += n
        return out

    def broadcast_from_last(self, t: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
        if self.pp == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.broadcast(t, src=self.pp_ranks[-1], group=self.pg.pp)
        return t


class _Branch:
    """One decoding branch (conditional or CFG-unconditional): its sequences and KV cache."""

    def __init__(self, runner: PipelineRunner, prefix: torch.Tensor, max_len: int, use_cache: bool):
        self.runner, self.seq, self.use_cache = runner, prefix, use_cache
        self.ctx = runner.new_contexts(prefix.shape[0], max_len) if use_cache else None
        self.fed = 0  # tokens already in the KV cache

    def step(self):
        if self.use_cache:
            out = self.runner.forward(self.seq[:, self.fed:], self.ctx, self.fed)
            self.fed = self.seq.shape[1]
            return out
        return self.runner.forward(self.seq, None, 0)

    def append(self, tok: torch.Tensor) -> None:
        self.seq = torch.cat([self.seq, tok.unsqueeze(1)], dim=1)


def _generate_bucket(runner: PipelineRunner, prompts: torch.Tensor, sample_ids: list[int], *, mode: str,
                     steps: int, stop_id: Optional[int], cfg: RolloutConfig, uncond: Optional[torch.Tensor]):
    """Generate for equal-length prompts [b, p]. Returns (sampled [b, steps'], logprobs, n_sampled [b])."""
    if cfg.fast and cfg.use_kv_cache and DecodeEngine.supports(runner.chunks):
        return DecodeEngine(runner.chunks, runner.pg, steps=cfg.decode_steps).generate(
            prompts, sample_generators(cfg.seed, sample_ids), mode=mode, steps=steps, stop_id=stop_id,
            sampling=cfg.sampling, cfg_scale=cfg.cfg_scale, uncond=uncond)
    mcfg = runner.chunks[0].model_cfg
    b, p = prompts.shape
    gens = sample_generators(cfg.seed, sample_ids)
    cond = _Branch(runner, prompts, p + steps, cfg.use_kv_cache)
    unc = None
    if uncond is not None:
        unc = _Branch(runner, uncond.unsqueeze(0).expand(b, -1).contiguous(), uncond.numel() + steps,
                      cfg.use_kv_cache)
    done = torch.zeros(b, dtype=torch.bool)
    n_sampled = torch.zeros(b, dtype=torch.long)
    toks, lps = [], []
    for _ in range(steps):
        out = cond.step()
        out_u = unc.step() if unc is not None else None
        packed = None
        if runner.is_last_stage:
            if mode == "image":
                logits = out[1][:, : mcfg.image_vocab_size]
                guided = logits
                if out_u is not None:
                    u = out_u[1][:, : mcfg.image_vocab_size]
                    guided = u + cfg.cfg_scale * (logits - u)
            else:
                logits = guided = out[0]
            choice = draw(guided, cfg.sampling, gens)
            lp = token_logprobs(logits, choice)
            # float64 holds every token id exactly; one broadcast carries both values.
            packed = torch.stack([choice.double(), lp.double()], dim=1)
        packed = runner.broadcast_from_last(packed, (b, 2), torch.float64, prompts.device).cpu()
        choice, lp = packed[:, 0].long(), packed[:, 1].float()
        tok = choice + mcfg.text_vocab_size if mode == "image" else choice
        if stop_id is not None:
            tok = torch.where(done, torch.full_like(tok, stop_id), tok)
        n_sampled += (~done).long()
        toks.append(tok)
        lps.append(lp)
        if stop_id is not None:
            done |= tok == stop_id
            if bool(done.all()):
                break
        dev = prompts.device
        cond.append(tok.to(dev))
        if unc is not None:
            unc.append(tok.to(dev))
    return torch.stack(toks, 1), torch.stack(lps, 1), n_sampled


def _run(chunks, pg, prompts, prompt_ids, *, mode, steps, stop_id, cfg: RolloutConfig, uncond=None,
         suffix: Optional[int] = None) -> list[Rollout]:
    cfg.validate()
    runner = PipelineRunner(chunks, pg)
    mcfg = runner.chunks[0].model_cfg
    if prompt_ids is None:
        # Contiguous split of the global prompt list over DP replicas.
        prompt_ids = [pg.dp.rank() * len(prompts) + i for i in range(len(prompts))]
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt_ids")
    G = cfg.samples_per_prompt
    rows = []  # (prompt tensor, prompt_id, sample_id)
    for pid, prompt in zip(prompt_ids, prompts):
        t = torch.as_tensor(list(prompt), dtype=torch.long)
        if t.numel() == 0:
            raise ValueError(f"prompt {pid} is empty: pass at least one token (e.g. the image prefix)")
        if int(t.max()) >= mcfg.text_vocab_size + mcfg.image_table_size or int(t.min()) < 0:
            raise ValueError(f"prompt {pid} has token ids outside [0, {mcfg.text_vocab_size + mcfg.image_table_size})")
        rows += [(t, int(pid), int(pid) * G + j) for j in range(G)]
    device = next(runner.chunks[0].parameters()).device
    was_training = [c.training for c in runner.chunks]
    for c in runner.chunks:
        c.eval()
    results: list[Optional[Rollout]] = [None] * len(rows)
    try:
        by_len: dict[int, list[int]] = {}
        for i, (t, _, _) in enumerate(rows):
            by_len.setdefault(t.numel(), []).append(i)
        for length in sorted(by_len):
            idxs = by_len[length]
            for s in range(0, len(idxs), cfg.max_rows_per_forward):
                part = idxs[s : s + cfg.max_rows_per_forward]
                batch = torch.stack([rows[i][0] for i in part]).to(device)
                sampled, lps, n = _generate_bucket(
                    runner, batch, [rows[i][2] for i in part], mode=mode, steps=steps, stop_id=stop_id,
                    cfg=cfg, uncond=None if uncond is None else uncond.to(device))
                for k, i in enumerate(part):
                    m = int(n[k])
                    gen = sampled[k, :m]
                    tail = [gen] + ([torch.tensor([suffix])] if suffix is not None else [])
                    results[i] = Rollout(
                        prompt_id=rows[i][1], sample_id=rows[i][2],
                        tokens=torch.cat([rows[i][0], *tail]), prompt_length=length,
                        logprobs=lps[k, :m].clone(),
                        codes=gen - mcfg.text_vocab_size if mode == "image" else None,
                    )
    finally:
        for c, t in zip(runner.chunks, was_training):
            c.train(t)
    return results  # type: ignore[return-value]


def generate_images(chunks, pg, prompts: Sequence[Sequence[int]], grid: tuple[int, int], eom_id: int,
                    cfg: Optional[RolloutConfig] = None, prompt_ids: Optional[Sequence[int]] = None,
                    uncond_prompt: Optional[Sequence[int]] = None) -> list[Rollout]:
    """G image rollouts per prompt; rows are ordered prompt-major (prompt i's samples i*G..i*G+G-1).

    Each prompt must already end with the image prefix `<SOM>{h} {w}<IMAGE>` (token ids; the
    caller owns the text tokenizer). Exactly h*w codes are sampled from the image head
    restricted to the `image_vocab_size` codes, then `eom_id` is appended.
    With `cfg.cfg_scale != 1`, `uncond_prompt` (the empty prompt + the same image prefix) feeds
    the unconditional branch; it is required then.
    """
    cfg = cfg or RolloutConfig()
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid {grid} must be two positive token counts (h, w)")
    uncond = None
    if cfg.cfg_scale != 1.0:
        if not uncond_prompt:
            raise ValueError("cfg_scale != 1 needs uncond_prompt (empty prompt + the image prefix ids)")
        uncond = torch.as_tensor(list(uncond_prompt), dtype=torch.long)
    return _run(chunks, pg, prompts, prompt_ids, mode="image", steps=h * w, stop_id=None, cfg=cfg,
                uncond=uncond, suffix=eom_id)


def generate_text(chunks, pg, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: Optional[int],
                  cfg: Optional[RolloutConfig] = None, prompt_ids: Optional[Sequence[int]] = None) -> list[Rollout]:
    """G text rollouts per prompt (text head only), stopping at `eos_id` (kept) or max_new_tokens."""
    cfg = cfg or RolloutConfig()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if cfg.cfg_scale != 1.0:
        raise ValueError("classifier-free guidance applies to image mode only: set cfg_scale=1.0")
    return _run(chunks, pg, prompts, prompt_ids, mode="text", steps=max_new_tokens, stop_id=eos_id, cfg=cfg)
