"""GRPO: group-normalised advantages, the clipped-ratio objective with a k3 KL penalty, and one
RL step (reference log-probs + `ppo_epochs` optimizer updates through megatron-core's schedule).

Per sampled token t of sequence i (A_i the sequence's advantage, r = exp(logp - old_logp)):
    L_t = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t,
    k3_t = exp(ref_logp - logp) - (ref_logp - logp) - 1      (>= 0, unbiased for KL(pi || ref))
Aggregation over a minibatch (all data-parallel ranks together):
    "sequence" (X-Omni): mean over each sequence's tokens, then mean over sequences;
    "token": sum over all tokens / number of tokens.
Both become one per-token weight tensor computed before the forward, so the loss a micro-batch
returns is already on the global scale and the result does not depend on how rows are split
into micro-batches, pipeline stages or data-parallel ranks.

Zero-variance groups (every sample of a prompt scored the same) carry no learning signal: their
advantages are 0, so they would only add the KL term and dilute the normaliser. With
`drop_zero_variance_groups` they are removed from the update (not forwarded, not in the
normaliser) and counted; a minibatch whose groups are all dropped on every replica skips its
optimizer step (an Adam step on a zero gradient would still move the weights by momentum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_xomni.rl.logprobs import _device, compute_logprobs, forward_seq_length, policy_logprobs_and_entropy
from megatron_xomni.rl.microbatches import plan_part
from megatron_xomni.inference.generation import Rollout, _unwrap

_STATS = ("objective", "pg_loss", "kl", "clipped", "entropy", "ratio", "tokens")


@dataclass
class GRPOConfig:
    """GRPO objective and update schedule."""

    clip_eps_low: float = 0.2
    """Lower clip: the ratio is clipped at 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper clip: the ratio is clipped at 1 + clip_eps_high (> clip_eps_low = DAPO's clip-higher)."""
    kl_beta: float = 0.01
    """Weight of the k3 KL penalty against the reference policy (X-Omni: 0.01; 0 skips the reference)."""
    adv_eps: float = 1e-6
    """Added to the group std before dividing."""
    scale_adv_by_std: bool = True
    """Divide by the group std (False: advantages are only mean-centred, as in Dr. GRPO)."""
    loss_aggregation: str = "sequence"
    """'sequence' (mean over tokens of a sequence, then over sequences; X-Omni) or 'token'."""
    ppo_epochs: int = 1
    """Passes over the rollouts per RL step."""
    num_minibatches: int = 1
    """Optimizer updates per epoch; update u takes the groups with prompt_id % num_minibatches == u."""
    micro_batch_size: int = 1
    """Rows per forward/backward micro-batch."""
    pad_id: int = 0
    """Token used to right-pad sequences (never scored)."""
    drop_zero_variance_groups: bool = True
    """Leave groups whose rewards are all equal (max - min <= zero_variance_tol) out of the update."""
    zero_variance_tol: float = 1e-9
    """Reward spread at or below which a group counts as zero-variance."""

    def validate(self) -> None:
        if self.loss_aggregation not in ("sequence", "token"):
            raise ValueError(f"loss_aggregation={self.loss_aggregation!r}: choose 'sequence' or 'token'")
        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ValueError(f"clip eps ({self.clip_eps_low}, {self.clip_eps_high}) must satisfy 0 <= low < 1, high >= 0")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta={self.kl_beta} must be >= 0")
        if self.zero_variance_tol < 0:
            raise ValueError(f"zero_variance_tol={self.zero_variance_tol} must be >= 0")
        for name in ("ppo_epochs", "num_minibatches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


# ---- math ----------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_ids: Sequence[int], eps: float = 1e-6,
                     scale_by_std: bool = True) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per group (std: unbiased, as torch.std; a group of one gets 0)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    gids = torch.as_tensor(list(group_ids), dtype=torch.long)
    if gids.numel() != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {gids.numel()} group ids")
    adv = torch.zeros_like(rewards)
    for g in torch.unique(gids):
        sel = gids == g
        r = rewards[sel]
        centred = r - r.mean()
        if scale_by_std:
            std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
            centred = centred / (std + eps)
        adv[sel] = centred
    return adv.float()


def zero_variance_groups(rewards: torch.Tensor, group_ids: Sequence[int], tol: float = 1e-9) -> set[int]:
    """Ids of the groups whose rewards all lie within `tol` of each other (no learning signal)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    gids = torch.as_tensor(list(group_ids), dtype=torch.long)
    out = set()
    for g in torch.unique(gids).tolist():
        r = rewards[gids == g]
        if float(r.max() - r.min()) <= tol:
            out.add(int(g))
    return out


def update_rows(rows: Sequence[int], keep: Sequence[bool], micro_batch_size: int) -> tuple[list[int], int]:
    """(rows to forward, how many of them are kept) for one minibatch.

    The kept rows, topped up with dropped rows (whose action mask is then zeroed) to a multiple of
    `micro_batch_size`; a replica whose rows are all dropped still forwards one zero-weight
    micro-batch, so that its collectives match the other replicas'. `rows` holds a multiple of
    `micro_batch_size`, so the dropped rows always suffice.
    """
    kept = [i for i in rows if keep[i]]
    dropped = [i for i in rows if not keep[i]]
    pad = micro_batch_size if not kept else (-len(kept)) % micro_batch_size
    return sorted(kept + dropped[:pad]), len(kept)


def grpo_token_terms(logp, old_logp, ref_logp, advantages, cfg: GRPOConfig) -> dict:
    """Per-token loss terms [b, s] (advantages broadcast per row: [b, 1] or [b, s])."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped_ratio = torch.clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = -torch.minimum(unclipped, clipped_ratio * advantages)
    if ref_logp is not None and cfg.kl_beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
    else:
        kl = torch.zeros_like(logp)
    is_clipped = ((advantages > 0) & (ratio > 1.0 + cfg.clip_eps_high)) | (
        (advantages < 0) & (ratio < 1.0 - cfg.clip_eps_low))
    return {"loss": pg + cfg.kl_beta * kl, "pg_loss": pg, "kl": kl, "ratio": ratio, "clipped": is_clipped}


def loss_weights(action_mask: torch.Tensor, aggregation: str, dp_group=None) -> torch.Tensor:
    """Per-token weights [N, s] whose weighted sum of token losses is the minibatch objective.

    Normalisers are global over `dp_group` (every data-parallel replica's part of the minibatch).
    """
    mask = action_mask if action_mask.is_floating_point() else action_mask.float()
    if aggregation == "token":
        total = mask.sum().double().reshape(1)
        if dp_group is not None:
            torch.distributed.all_reduce(total, group=dp_group)
        return mask / total.clamp(min=1).to(mask.dtype)
    per_seq = mask.sum(-1, keepdim=True)
    seqs = (per_seq > 0).double().sum().reshape(1)
    if dp_group is not None:
        torch.distributed.all_reduce(seqs, group=dp_group)
    return mask / per_seq.clamp(min=1) / seqs.clamp(min=1).to(mask.dtype)


def microbatch_loss_weights(masks: Sequence[torch.Tensor], aggregation: str, dp_group=None) -> list[torch.Tensor]:
    """`loss_weights` of one minibatch held as micro-batches of different lengths, one [b, s_j] per mask.

    The masks are zero-padded to one length for the normaliser (padding adds nothing to it) and the
    weights cut back to each micro-batch's length.
    """
    longest = max(m.shape[1] for m in masks)
    w = loss_weights(torch.cat([F.pad(m, (0, longest - m.shape[1])) for m in masks]), aggregation, dp_group)
    return [x[:, : m.shape[1]] for x, m in zip(w.split([m.shape[0] for m in masks]), masks)]


def grpo_loss_func(batch: dict, cfg: GRPOConfig, pg, scale: float, model, output):
    """megatron-core loss_func: (weighted loss * scale, 1, {"grpo": stats}).

    `scale` = num_microbatches * data-parallel size undoes the schedule's division by the number of
    micro-batches and DDP's gradient averaging over replicas, so the gradient is that of the
    global objective (the per-token weights already hold the global normaliser).
    """
    start = batch.get("logits_from", 0)  # positions before it are prompt: no logits, weight 0
    logp, ent = policy_logprobs_and_entropy(model, output, batch["labels"][:, start:], pg)
    mask = batch["action_mask"][:, start:]
    ref = batch.get("ref_logprobs")
    terms = grpo_token_terms(logp, batch["old_logprobs"][:, start:], None if ref is None else ref[:, start:],
                             batch["advantages"].unsqueeze(-1), cfg)
    w = batch["loss_weight"][:, start:]
    objective = (terms["loss"] * w).sum()
    with torch.no_grad():
        stats = torch.stack([
            objective.detach(), (terms["pg_loss"] * w).sum(), (terms["kl"] * mask).sum(),
            (terms["clipped"].float() * mask).sum(), (ent * mask).sum(), (terms["ratio"] * mask).sum(),
            mask.sum(),
        ]).double()
    return objective * scale, torch.ones((), dtype=torch.int, device=objective.device), {"grpo": stats}


def _forward_step(cfg: GRPOConfig, pg, scale: float, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, logits_from=batch.get("logits_from", 0),
                   only_head=batch.get("only_head"))
    return output, partial(grpo_loss_func, batch, cfg, pg, scale, model)


def _padding_stats(plan: list, rollouts: Sequence[Rollout]) -> dict:
    """This replica's positions per forward pass over the plan, their padded share, and the share of
    the positions that packing every forwarded row to the step's longest rollout would cost saved."""
    packed = sum(p.packed_tokens for p in plan)
    real = sum(p.real_tokens for p in plan)
    whole_step = sum(len(p.rows) for p in plan) * (max(r.tokens.numel() for r in rollouts) - 1)
    return {"packed_tokens": packed, "padded_token_share": 1.0 - real / packed if packed else 0.0,
            "padding_saved_share": 1.0 - packed / whole_step if whole_step else 0.0}


# ---- orchestration -------------------------------------------------------------------------------
class GRPOStep:
    """One RL step on this data-parallel replica's rollouts.

    policy_chunks: DDP-wrapped chunks from `wrap_and_build_optimizer` (with `optimizer`);
    ref_chunks: the frozen reference in the same layout (unwrapped is fine), or None when
    kl_beta == 0. Every rank of a replica passes the same rollouts and rewards; all samples of a
    prompt must be on one replica (rollouts are generated that way).

    Returns statistics: loss / pg_loss (objective per update, averaged over updates), kl,
    clip_fraction, entropy and ratio_mean (token means over all replicas and updates),
    first_update_ratio_mean (1 for on-policy rollouts), grad_norms per update, dropped_groups and
    dropped_group_share (zero-variance groups left out, over all replicas), num_updates and
    skipped_updates (minibatches with no group left anywhere), and this replica's reward_mean,
    advantage_abs_mean and response_length (entropy, kl, ... cover the kept rows only; NaN when
    nothing was kept); this replica's micro-batch plan: packed_tokens (positions one forward pass
    over it computes), padded_token_share (their share that is padding) and padding_saved_share (the
    share of the positions that packing every forwarded row to the step's longest rollout would
    compute that the plan saves); `time` splits seconds into prepare (including the plan) /
    reference / update (generation is timed by the caller).
    """

    def __init__(self, policy_chunks: list, optimizer, pg, cfg: Optional[GRPOConfig] = None,
                 ref_chunks: Optional[list] = None):
        cfg = cfg or GRPOConfig()
        cfg.validate()
        if cfg.kl_beta > 0 and ref_chunks is None:
            raise ValueError("kl_beta > 0 needs ref_chunks (the frozen reference policy); or set kl_beta=0")
        self.policy, self.optimizer, self.pg, self.cfg, self.ref = policy_chunks, optimizer, pg, cfg, ref_chunks

    def _update(self, microbatches: list[dict]) -> tuple[torch.Tensor, bool, float]:
        from megatron_xomni.training.optim import zero_grads

        chunks = self.policy
        fb = get_forward_backward_func(pp_size=self.pg.pp.size(), vp_size=len(chunks) if len(chunks) > 1 else None)
        scale = float(len(microbatches) * self.pg.dp_cp.size())
        for m in chunks:
            m.train()
        zero_grads(chunks, self.optimizer)
        store = fb(
            forward_step_func=partial(_forward_step, self.cfg, self.pg, scale),
            data_iterator=[iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=forward_seq_length(microbatches, self.pg.pp.size()),
            micro_batch_size=microbatches[0]["tokens"].shape[0],
            forward_only=False,
        )
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=_device(chunks))
        for item in store or []:
            stats += item["grpo"].double()
        torch.distributed.all_reduce(stats, group=self.pg.pp)  # only the last stage has values
        torch.distributed.all_reduce(stats, group=self.pg.dp_cp)
        stats = stats.cpu()
        ok, grad_norm, _ = self.optimizer.step()
        return stats, bool(ok), float(grad_norm) if grad_norm is not None else float("nan")

    def __call__(self, rollouts: Sequence[Rollout], rewards) -> dict:
        cfg, pg = self.cfg, self.pg
        times = {}
        t0 = time.perf_counter()
        rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
        if rewards.numel() != len(rollouts):
            raise ValueError(f"{len(rollouts)} rollouts but {rewards.numel()} rewards")
        # Minibatch u holds the groups with prompt_id % num_minibatches == u: the same global
        # minibatches whatever the data-parallel split, and groups are never cut.
        parts = [[i for i, r in enumerate(rollouts) if r.prompt_id % cfg.num_minibatches == u]
                 for u in range(cfg.num_minibatches)]
        for u, rows in enumerate(parts):
            if not rows or len(rows) % cfg.micro_batch_size:
                raise ValueError(
                    f"minibatch {u} (prompt_id % {cfg.num_minibatches} == {u}) has {len(rows)} local rollouts, "
                    f"not a positive multiple of micro_batch_size={cfg.micro_batch_size}: give every replica "
                    f"prompts of every residue class and a micro_batch_size dividing each part"
                )
        gids = [r.prompt_id for r in rollouts]
        adv = group_advantages(rewards, gids, cfg.adv_eps, cfg.scale_adv_by_std)
        flat = zero_variance_groups(rewards, gids, cfg.zero_variance_tol) if cfg.drop_zero_variance_groups else set()
        keep = [g not in flat for g in gids]
        # groups over all replicas (a group lives on one replica; every rank of a replica has the same rows)
        counts = torch.tensor([float(len(set(gids))), float(len(flat))], dtype=torch.float64)
        torch.distributed.all_reduce(counts, group=pg.dp)
        # One micro-batch plan for the whole step (rl/microbatches.py): the reference recompute and
        # every update of every epoch run on the same packed micro-batches. Each forward computes
        # logits only from its first sampled position on, and only with the head that scores its
        # sampled tokens (rl/logprobs.py scored_span).
        text_vocab = _unwrap(self.policy[0]).model_cfg.text_vocab_size
        one_length = pg.pp.size() > 1 or len(self.policy) > 1
        device = _device(self.policy)
        plan = []
        for rows in parts:
            used, n_kept = update_rows(rows, keep, cfg.micro_batch_size)
            kept_anywhere = torch.tensor([float(n_kept)], dtype=torch.float64)
            torch.distributed.all_reduce(kept_anywhere, group=pg.dp_cp)
            if kept_anywhere.item() > 0:  # else every replica skips this update (no optimizer step)
                part = plan_part(rollouts, used, keep, adv, cfg.micro_batch_size, pad_id=cfg.pad_id,
                                 text_vocab_size=text_vocab, one_length=one_length, device=device)
                weights = microbatch_loss_weights([m["action_mask"] for m in part.microbatches],
                                                  cfg.loss_aggregation, pg.dp_cp)
                for m, w in zip(part.microbatches, weights):
                    m["loss_weight"] = w
                plan.append(part)
        times["prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if cfg.kl_beta > 0:  # one reference forward per part, on the update's own micro-batches
            for part in plan:
                for m, lp in zip(part.microbatches, compute_logprobs(self.ref, pg, part.microbatches)):
                    m["ref_logprobs"] = lp
        times["reference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        updates = []
        for _ in range(cfg.ppo_epochs):
            for part in plan:
                updates.append(self._update(part.microbatches))
        times["update"] = time.perf_counter() - t0

        n_groups, n_dropped = counts.tolist()
        lengths = torch.tensor([float(r.num_sampled) for r in rollouts])
        common = {
            "dropped_groups": n_dropped, "dropped_group_share": n_dropped / max(n_groups, 1.0),
            "num_updates": len(updates), "skipped_updates": (len(parts) - len(plan)) * cfg.ppo_epochs,
            "reward_mean": rewards.mean().item(), "advantage_abs_mean": adv.abs().mean().item(),
            "response_length": lengths.mean().item(), **_padding_stats(plan, rollouts), "time": times,
        }
        if not updates:  # every group of the step had zero variance: nothing was trained
            nan = float("nan")
            return {"loss": 0.0, "pg_loss": 0.0, "kl": nan, "clip_fraction": nan, "entropy": nan,
                    "ratio_mean": nan, "first_update_ratio_mean": nan, "grad_norms": [], "updates_ok": True,
                    **common}
        total = torch.stack([s for s, _, _ in updates]).sum(0)
        tokens = total[_STATS.index("tokens")].clamp(min=1)
        first = updates[0][0]
        return {
            "loss": (total[0] / len(updates)).item(),
            "pg_loss": (total[1] / len(updates)).item(),
            "kl": (total[2] / tokens).item(),
            "clip_fraction": (total[3] / tokens).item(),
            "entropy": (total[4] / tokens).item(),
            "ratio_mean": (total[5] / tokens).item(),
            "first_update_ratio_mean": (first[5] / first[6].clamp(min=1)).item(),
            "grad_norms": [g for _, _, g in updates],
            "updates_ok": all(ok for _, ok, _ in updates),
            **common,
        }
