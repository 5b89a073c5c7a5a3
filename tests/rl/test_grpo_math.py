"""GRPO advantages, clipped objective, k3 KL and aggregation against a direct per-token loop."""

import math

import pytest
import torch

from megatron_xomni.rl.grpo import GRPOConfig, group_advantages, grpo_token_terms, loss_weights

N, S = 6, 7
GROUPS = [0, 0, 0, 1, 1, 1]
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.9, 0.9]


def _data():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(N, S, generator=g) * 3
    # Ratios spread over [0.6, 1.5] so both clip sides are hit.
    logp = old + torch.empty(N, S).uniform_(-0.5, 0.4, generator=g)
    ref = old + torch.randn(N, S, generator=g) * 0.3
    mask = torch.ones(N, S)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    mask[4, 6:] = 0
    return logp, old, ref, mask


def direct_advantages(eps, scale):
    out = []
    for i in range(N):
        rs = [REWARDS[j] for j in range(N) if GROUPS[j] == GROUPS[i]]
        mu = sum(rs) / len(rs)
        sd = math.sqrt(sum((r - mu) ** 2 for r in rs) / (len(rs) - 1))
        out.append((REWARDS[i] - mu) / (sd + eps) if scale else REWARDS[i] - mu)
    return out


def direct_loss_and_grad(logp, old, ref, mask, adv, lo, hi, beta, agg):
    """Value and d/dlogp written out per token: clipped surrogate + beta * k3."""
    n_tok = sum(mask.flatten().tolist())
    n_seq = sum(1 for i in range(N) if mask[i].sum() > 0)
    loss, grad = 0.0, torch.zeros(N, S, dtype=torch.float64)
    for i in range(N):
        n_i = mask[i].sum().item()
        for t in range(S):
            if not mask[i, t]:
                continue
            lp, o, rf, a = logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i]
            r = math.exp(lp - o)
            rc = min(max(r, 1 - lo), 1 + hi)
            surr = min(r * a, rc * a)
            # gradient of -min(r a, clip(r) a): -r a when the unclipped term is the minimum, else 0
            # (the clipped term is constant in r outside [1-lo, 1+hi]).
            d_surr = -r * a if r * a <= rc * a else 0.0
            k3 = math.exp(rf - lp) - (rf - lp) - 1
            d_k3 = -math.exp(rf - lp) + 1
            w = 1 / n_tok if agg == "token" else 1 / (n_i * n_seq)
            loss += w * (-surr + beta * k3)
            grad[i, t] = w * (d_surr + beta * d_k3)
    return loss, grad


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_formula(scale):
    adv = group_advantages(torch.tensor(REWARDS), GROUPS, eps=1e-4, scale_by_std=scale)
    assert torch.allclose(adv.double(), torch.tensor(direct_advantages(1e-4, scale), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("agg", ["sequence", "token"])
@pytest.mark.parametrize("lo,hi,beta", [(0.2, 0.28, 0.01), (0.1, 0.1, 0.5)])
def test_loss_and_gradient_match_direct_formula(agg, lo, hi, beta):
    logp, old, ref, mask = _data()
    adv = group_advantages(torch.tensor(REWARDS), GROUPS, eps=1e-6)
    cfg = GRPOConfig(clip_eps_low=lo, clip_eps_high=hi, kl_beta=beta, loss_aggregation=agg)
    x = logp.clone().double().requires_grad_(True)
    terms = grpo_token_terms(x, old.double(), ref.double(), adv.double().unsqueeze(-1), cfg)
    w = loss_weights(mask.double(), agg)
    loss = (terms["loss"] * w).sum()
    loss.backward()
    want_loss, want_grad = direct_loss_and_grad(logp.double(), old.double(), ref.double(), mask,
                                                adv.double().tolist(), lo, hi, beta, agg)
    assert abs(loss.item() - want_loss) <= 1e-9
    assert torch.allclose(x.grad, want_grad, atol=1e-10)
    # both clip sides are exercised by this data
    ratio = torch.exp(logp - old)
    a = adv.unsqueeze(-1)
    assert bool((((a > 0) & (ratio > 1 + hi)) & mask.bool()).any())
    assert bool((((a < 0) & (ratio < 1 - lo)) & mask.bool()).any())
    clipped = terms["clipped"] & mask.bool()
    assert clipped.sum() == (((a > 0) & (ratio > 1 + hi)) | ((a < 0) & (ratio < 1 - lo)))[mask.bool()].sum()


def test_k3_is_zero_at_reference_and_ratio_one_gives_plain_pg():
    logp = torch.randn(3, 4)
    cfg = GRPOConfig(kl_beta=0.01)
    adv = torch.tensor([[1.0], [-2.0], [0.5]])
    terms = grpo_token_terms(logp, logp, logp, adv, cfg)
    assert torch.equal(terms["kl"], torch.zeros_like(logp))
    assert torch.equal(terms["loss"], -adv.expand(3, 4))


def test_sequence_weights_are_per_sequence_means():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = loss_weights(mask, "sequence")
    assert torch.allclose(w, torch.tensor([[0.25, 0.25, 0, 0], [0.125] * 4]))
    assert torch.allclose(loss_weights(mask, "token"), mask / 6)


def test_bad_settings_give_clear_errors():
    from megatron_xomni.inference.generation import RolloutConfig, generate_images, generate_text

    with pytest.raises(ValueError, match="loss_aggregation"):
        GRPOConfig(loss_aggregation="batch").validate()
    with pytest.raises(ValueError, match="uncond_prompt"):
        generate_images(None, None, [[1, 2]], (2, 2), 4, RolloutConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="image mode only"):
        generate_text(None, None, [[1, 2]], 4, None, RolloutConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="grid"):
        generate_images(None, None, [[1, 2]], (0, 2), 4)
    with pytest.raises(ValueError, match="group ids"):
        group_advantages(torch.ones(3), [0, 0])


def test_scored_span_names_first_sampled_position_and_the_one_head():
    from megatron_xomni.rl.logprobs import scored_span

    v = 100
    labels = torch.tensor([[5, 6, 7, v + 1, v + 2, 4], [5, 6, v + 3, v + 4, 4, 0]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.float)
    assert scored_span({"labels": labels, "action_mask": mask}, v) == {"logits_from": 2, "only_head": "image"}
    text = {"labels": labels, "action_mask": torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0.0]])}
    assert scored_span(text, v) == {"logits_from": 1, "only_head": "text"}
    mixed = {"labels": labels, "action_mask": torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0.0]])}
    assert scored_span(mixed, v) == {"logits_from": 2, "only_head": None}
    nothing = {"labels": labels, "action_mask": torch.zeros(2, 6)}
    assert scored_span(nothing, v) == {"logits_from": 0, "only_head": None}
