"""Reward diagnostics on reward tables: the decoder-noise floor, honest best-of-N, per-skill metrics.

Pure arithmetic on numbers the evaluation runner (inference/evaluate.py) measured, so each
figure can be checked by hand. Notation: R[i, j, k] is the reward of prompt i's sample j (a token
sequence of the policy) rendered with decoder seed k (K seeds per sequence).

Noise floor (`noise_floor`): all variances are population variances (ddof = 0), so every split
below is an exact identity of the table (the law of total variance with equal weights):

    within group i, independent seeds:   Var_jk(R_i..)  =  Var_j(m_ij)  +  mean_j Var_k(R_ij.)
                                          (total)          (tokens)       (decoder seed)
    with m_ij = mean_k R_ijk. Averaged over prompts this gives `within_total`, `within_tokens` and
    `within_decoder`; `decoder_share_within` = within_decoder / within_total.

    overall:  Var_ijk(R)  =  Var_i(mean_jk R_i..)  +  within_tokens  +  within_decoder
              (total)        (between prompts)
    `decoder_share_overall` = within_decoder / overall_total.

    within group i, one seed k shared by the group (what GRPO does with common random numbers),
    over the decodes k >= `shared_from` whose seed is shared by all samples of the prompt (K' of them):
              mean_k Var_j(R_i.k)  =  Var_j(m'_ij)  +  mean_k Var_j(d_i.k),   d_ijk = R_ijk - m'_ij
    with m'_ij the mean over those decodes (the cross term averages out because mean_k d_ijk = 0).
    The second term is the decoder noise a shared seed leaves in a group (how differently one seed
    treats different sequences); `decoder_share_within_shared_seed` is its share of the left-hand
    side (NaN when fewer than 2 decodes are shared: noise and tokens cannot be told apart).

With K seeds, Var_k(.) (ddof 0) underestimates the per-decode noise variance by (K-1)/K and the
token term carries 1/K of it; the shares are exact descriptions of the measured table, not
bias-corrected estimates.

Best-of-N (`best_of_n`): the naive figure picks each prompt's best sample by its reward and
reports that same reward, so it also selects lucky decoder noise. The honest figure picks by the
reward of decode 0 and reports the reward of the same token sequence under fresh decoder seeds
(the evaluation runner passes the mean over decodes 1..K-1), which the pick has not seen. Ties go
to the lowest sample index.

Per-skill metrics (`per_skill_metrics`): for the world's GenEval-style skills, *accuracy* is
all-or-nothing (an image counts 1 only when every check of its prompt passes: GenEval's metric)
and *partial credit* is the fraction of checks passed (the RL reward, `world_alignment`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import numpy as np


def _share(part: float, total: float) -> float:
    return float(part / total) if total > 0 else float("nan")  # NaN > 0 is False: NaN stays NaN


def noise_floor(rewards, shared_from: int = 0) -> dict:
    """The variance split of R[i, j, k] (prompts x samples x decoder seeds; K >= 2) described above.

    Every sequence's K decodes must use K different seeds; decodes k >= `shared_from` must use one
    seed for all samples of a prompt (the shared-seed figures are read from those)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 3 or r.shape[2] < 2 or r.shape[1] < 1:
        raise ValueError(f"rewards must be [prompts, samples, decoder seeds >= 2], got shape {r.shape}")
    m = r.mean(axis=2)                                   # m_ij
    within_total = r.reshape(r.shape[0], -1).var(axis=1).mean()
    within_decoder = r.var(axis=2).mean()
    within_tokens = m.var(axis=1).mean()
    shared = r[:, :, shared_from:]
    if shared.shape[2] >= 2:
        d = shared - shared.mean(axis=2, keepdims=True)
        shared_total = shared.var(axis=1).mean()         # mean over i, k of Var_j(R_i.k)
        shared_decoder = d.var(axis=1).mean()
    else:
        shared_total = shared_decoder = float("nan")
    overall_total = r.var()
    between = r.mean(axis=(1, 2)).var()
    return {
        "prompts": int(r.shape[0]), "samples": int(r.shape[1]), "decoder_seeds": int(r.shape[2]),
        "within_total": float(within_total), "within_tokens": float(within_tokens),
        "within_decoder": float(within_decoder), "decoder_share_within": _share(within_decoder, within_total),
        "overall_total": float(overall_total), "between_prompts": float(between),
        "decoder_share_overall": _share(within_decoder, overall_total),
        "shared_seed_within_total": float(shared_total), "shared_seed_within_decoder": float(shared_decoder),
        "decoder_share_within_shared_seed": _share(shared_decoder, shared_total),
        "shared_seed_decodes": int(max(shared.shape[2], 0)),
        "mean_reward": float(r.mean()),
    }


def best_of_n(select, rescore) -> dict:
    """select[i][j]: the reward the pick sees; rescore[i][j]: the same sequence under a fresh seed.

    {"naive": mean_i max_j select_ij, "honest": mean_i rescore[i, argmax_j select_ij], "n": N}."""
    s, f = np.asarray(select, dtype=np.float64), np.asarray(rescore, dtype=np.float64)
    if s.ndim != 2 or s.shape != f.shape or s.size == 0:
        raise ValueError(f"select and rescore must be equal [prompts, N] tables, got {s.shape} and {f.shape}")
    pick = s.argmax(axis=1)
    return {"naive": float(s.max(axis=1).mean()),
            "honest": float(f[np.arange(len(pick)), pick].mean()), "n": int(s.shape[1])}


def per_skill_metrics(rows: Iterable[dict]) -> dict:
    """rows: one per image, {"skill", "fraction"} (fraction of the prompt's checks passed).

    {"accuracy": {skill: all-or-nothing mean}, "partial_credit": {skill: mean fraction},
     "overall_accuracy", "overall_partial_credit" (means over skills, each skill weighted equally)}."""
    frac = defaultdict(list)
    for row in rows:
        f = float(row["fraction"])
        if not (0.0 <= f <= 1.0) or math.isnan(f):
            raise ValueError(f"fraction {f} of skill {row['skill']!r} is outside [0, 1]")
        frac[row["skill"]].append(f)
    if not frac:
        raise ValueError("per_skill_metrics needs at least one scored image")
    acc = {k: sum(1.0 for f in v if f >= 1.0) / len(v) for k, v in sorted(frac.items())}
    part = {k: sum(v) / len(v) for k, v in sorted(frac.items())}
    return {"accuracy": acc, "partial_credit": part,
            "overall_accuracy": sum(acc.values()) / len(acc), "overall_partial_credit": sum(part.values()) / len(part)}
