"""Logit processors and reproducible per-sample sampling.

Processor order follows `transformers`' `generate`: temperature, then top-k, then top-p, then
min-p. Each processor takes logits [b, V] (masked entries at -inf) and returns logits with the
removed entries set to -inf, so they compose and stay usable with any later processor.

Randomness: every sample owns a `torch.Generator` seeded from (seed, sample id) and draws one
uniform number per decoding step; the token is found by inverse-CDF over the processed
distribution. A sample's tokens therefore depend only on its own logits and its own stream,
never on which other samples share the batch, the batch order, or the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# splitmix64-style mixing constants: (seed, index) -> a well spread 63-bit generator seed.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingConfig:
    """How tokens are drawn. Defaults are X-Omni's inference defaults (T=1.0, min-p 0.03)."""

    temperature: float = 1.0
    """Logits are divided by this; 0 means greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 disables)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1.0 disables)."""
    min_p: float = 0.03
    """Drop tokens whose probability is below min_p * (probability of the most likely token) (0 disables)."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 disables top-p)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 disables min-p)")


def sample_seed(seed: int, sample_id: int) -> int:
    """Generator seed of one sample: a splitmix64 hash of (seed, sample_id), non-negative 63 bits."""
    z = (seed * _GOLDEN + sample_id + 1) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample_generators(seed: int, sample_ids) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, sample id)."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in sample_ids]


# ---- processors -----------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling (use greedy decoding for 0)")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their total probability reaches p.

    The most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # Probability mass strictly before each token: a token is kept while that mass is < p.
    before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens with probability < min_p * max probability (the argmax always survives)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """temperature -> top-k -> top-p -> min-p, as `transformers`' generate orders them."""
    out = apply_temperature(logits.float(), cfg.temperature)
    out = top_k_filter(out, cfg.top_k)
    out = top_p_filter(out, cfg.top_p)
    return min_p_filter(out, cfg.min_p)


def draw(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `logits` [b, V]: greedy when temperature is 0, else sampled.

    Sampling is inverse-CDF with one float64 uniform per row from that row's generator.
    """
    if logits.shape[0] != len(generators):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(generators)} generators")
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, cfg), dim=-1).double()
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # First index whose cumulative mass exceeds the target: zero-probability tokens never win.
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=logits.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log-softmax(logits)[token] in fp32: the unmodified policy's log-prob (temperature 1)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
