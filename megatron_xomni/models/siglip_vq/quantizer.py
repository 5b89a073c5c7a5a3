"""Index-backpropagation vector quantizer (X-Omni section 1).

Features z and codes e are L2-normalised, so the squared distance is d = 2 - 2 z.e and the
nearest code is the argmax of the dot product. Training uses the soft assignment
softmax(-d / tau) with a straight-through hard one-hot: the forward value is exactly the
nearest code, while gradients reach z and *every* code through the soft weights (index
backprop keeps the whole codebook alive). softmax(-d / tau) = softmax(2 z.e / tau), so the
soft mixture softmax(-d/tau) @ E is one attention call (query z, keys = values = E,
scale 2/tau), which `scaled_dot_product_attention` computes without materialising N x K
weights where a fused kernel applies (on GPUs those cap the head dim, so D = 2048 takes the
math path: N x K weights, as in a plain implementation).

Losses (means over all tokens and channels; skipped samples included, as in X-Omni):
    index_loss      = mean((q_st - z)^2)          q_st: straight-through code (grads via soft path)
    codebook_loss   = mean((e_hard - sg(z))^2)     pulls the chosen codes to the features
    commitment_loss = beta * mean((z - sg(e_hard))^2)   pulls the features to their codes
    loss            = index_loss + codebook_loss + commitment_loss
beta (0.25) sits on the encoder-side commitment term, the VQ-VAE convention; the authors'
released inference code puts its beta on the codebook-side term instead (training code is
unreleased), so swap the roles by setting codebook/commitment weights in the caller if needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 4096,
                 max_scores: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest (unit-norm) code for each (unit-norm) row of z.

    z: [N, D], codebook: [K, D], both L2-normalised. Returns LongTensor [N].
    argmin ||z - e||^2 = argmax z.e; codes are scored `chunk_size` at a time against blocks of
    max(1, max_scores // chunk_size) rows, so the score matrix never exceeds
    max(max_scores, chunk_size) entries (64 MiB in fp32 by default) whatever N and K are.
    Ties keep the lowest index (as `argmin` does). Low-precision inputs are scored in fp32.
    """
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code needs z [N, D] and codebook [K, D], got {tuple(z.shape)} "
                         f"and {tuple(codebook.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    row_block = max(1, max_scores // chunk_size)
    for r0 in range(0, z.shape[0], row_block):
        rows = z[r0:r0 + row_block]
        best_val = torch.full((rows.shape[0],), float("-inf"), dtype=dtype, device=z.device)
        best_idx = torch.zeros(rows.shape[0], dtype=torch.long, device=z.device)
        for c0 in range(0, codebook.shape[0], chunk_size):
            val, idx = (rows @ codebook[c0:c0 + chunk_size].to(dtype).T).max(dim=1)
            better = val > best_val  # strict: an equal score in a later chunk keeps the earlier index
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + c0, best_idx)
        out[r0:r0 + row_block] = best_idx
    return out


def soft_code_mixture(z: torch.Tensor, codebook: torch.Tensor, temperature: float,
                      detach_values: bool = False) -> torch.Tensor:
    """softmax(-d / tau) @ codebook for unit-norm z [N, D] and codebook [K, D] (differentiable).

    With `detach_values` gradients reach the codebook only through the softmax weights.
    """
    # d = 2 - 2 z.e; the constant drops out of the softmax, leaving scale 2 / tau on z.e.
    values = codebook.detach() if detach_values else codebook
    out = F.scaled_dot_product_attention(z[None, None], codebook[None, None], values[None, None],
                                         scale=2.0 / temperature)
    return out[0, 0]


def code_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used at least once, perplexity exp(H(p))) of a [K] count vector."""
    counts = counts.double()
    total = counts.sum().clamp_min(1.0)
    probs = counts / total
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    return (counts > 0).double().mean().float(), entropy.exp().float()


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor
    """[B, N, D] unit-norm codes (straight-through in training); skipped samples carry z."""
    codes: torch.Tensor
    """[B, N] nearest-code indices (computed for skipped samples too)."""
    loss: torch.Tensor
    """index_loss + codebook_loss + commitment_loss."""
    index_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    """Already multiplied by commitment_beta."""
    skip_mask: torch.Tensor
    """[B] bool, samples that bypassed quantization."""
    usage_fraction: torch.Tensor
    """Fraction of the codebook used by this batch."""
    perplexity: torch.Tensor
    """exp(entropy) of this batch's code histogram."""


class IndexBackpropQuantizer(nn.Module):
    """Vector quantizer over a [K, D] codebook with usage tracking and dead-code re-seeding."""

    def __init__(self, cfg: SigLIPVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Random unit vectors: uniform on the sphere, the same distribution the features live on.
        self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.codebook_size, cfg.codebook_dim), dim=-1))
        # Usage since the last reset/re-seed (training forwards only); not part of checkpoints.
        self.register_buffer("code_counts", torch.zeros(cfg.codebook_size, dtype=torch.long), persistent=False)
        n = cfg.reseed_buffer_size
        self.register_buffer("recent_features", torch.zeros(n, cfg.codebook_dim), persistent=False)
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("recent_ptr", torch.zeros((), dtype=torch.long), persistent=False)

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    @torch.no_grad()
    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit-norm code vectors for integer codes of any shape -> [..., D]."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.normalized_codebook())

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """features: [B, N, D] (not yet normalised)."""
        b, n, d = features.shape
        z = F.normalize(features, dim=-1).reshape(b * n, d)
        codebook = self.normalized_codebook()
        idx = nearest_code(z.detach(), codebook.detach(), self.cfg.search_chunk_size)
        e_hard = codebook[idx]  # gradients reach the chosen codes
        if self.training:
            # Straight-through one-hot (hard - sg(soft) + soft) @ E: the value is exactly e_hard; E
            # gets hard^T g plus the softmax-weight path, z gets the softmax-weight path. Values are
            # detached in the soft mixture because its value path (soft^T g) cancels against the
            # -sg(soft) @ E term.
            soft = soft_code_mixture(z, codebook, self.cfg.quant_temperature, detach_values=True)
            q = e_hard + (soft - soft.detach())
        else:
            q = e_hard
        index_loss = (q - z).pow(2).mean()
        codebook_loss = (e_hard - z.detach()).pow(2).mean()
        commitment_loss = self.cfg.commitment_beta * (z - e_hard.detach()).pow(2).mean()

        q = q.reshape(b, n, d)
        z = z.reshape(b, n, d)
        if self.training and self.cfg.skip_quant_prob > 0:
            skip = torch.rand(b, device=features.device) < self.cfg.skip_quant_prob
            q = torch.where(skip[:, None, None], z, q)
        else:
            skip = torch.zeros(b, dtype=torch.bool, device=features.device)

        batch_counts = torch.bincount(idx, minlength=self.cfg.codebook_size)
        if self.training:
            with torch.no_grad():
                self.code_counts += batch_counts
                self._remember(z.detach().reshape(b * n, d))
        usage, ppl = code_stats(batch_counts)
        return QuantizerOutput(q, idx.reshape(b, n), index_loss + codebook_loss + commitment_loss, index_loss,
                               codebook_loss, commitment_loss, skip, usage, ppl)

    # ------------------------------------------------------------------ usage / re-seeding
    @torch.no_grad()
    def _remember(self, z: torch.Tensor) -> None:
        """Push a random subset of this batch's unit features into the ring buffer."""
        size = self.recent_features.shape[0]
        if size == 0:
            return
        take = z[torch.randperm(z.shape[0], device=z.device)[:size]]
        pos = (self.recent_ptr + torch.arange(take.shape[0], device=z.device)) % size
        self.recent_features[pos] = take.to(self.recent_features.dtype)
        self.recent_ptr.copy_((self.recent_ptr + take.shape[0]) % size)
        self.recent_filled.copy_(torch.clamp(self.recent_filled + take.shape[0], max=size))

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Usage since the last reset: fraction of codes used and perplexity (summed over ranks)."""
        counts = self.code_counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        usage, ppl = code_stats(counts)
        return {"usage_fraction": float(usage), "perplexity": float(ppl), "tokens": int(counts.sum())}

    @torch.no_grad()
    def reset_usage(self) -> None:
        self.code_counts.zero_()

    @torch.no_grad()
    def reseed_dead_codes(self, min_count: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-seed codes used fewer than `min_count` times since the last reset.

        Rule: each dead code is replaced by a distinct recent encoder feature (unit-norm, drawn
        uniformly from the ring buffer of the last `reseed_buffer_size` training tokens; with
        replacement only if there are more dead codes than buffered features), so it lands
        where features actually are and wins assignments at once. Usage counts are then reset.
        Under torch.distributed, counts are summed over ranks and rank 0's choice is broadcast,
        keeping replicas identical. Returns the re-seeded code indices (callers may want to
        zero those rows' optimizer state).
        """
        counts = self.code_counts.clone()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        dead = torch.nonzero(counts < min_count).flatten()
        filled = int(self.recent_filled)
        if dead.numel() and filled == 0:
            raise ValueError("no recent features to re-seed from: run training forwards first "
                             "(or set reseed_buffer_size > 0)")
        if dead.numel() and (not distributed or dist.get_rank() == 0):
            pool = self.recent_features[:filled]
            if filled >= dead.numel():
                pick = torch.randperm(filled, generator=generator)[: dead.numel()]
            else:
                pick = torch.randint(filled, (dead.numel(),), generator=generator)
            self.codebook.data[dead] = F.normalize(pool[pick.to(pool.device)], dim=-1).to(self.codebook.dtype)
        if distributed and dead.numel():
            dist.broadcast(self.codebook.data, src=0)
        self.reset_usage()
        return dead
