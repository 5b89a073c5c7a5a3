"""Logit processors against brute-force per-row references and transformers' warpers."""

import math

import pytest
import torch

from megatron_xomni.inference.sampling import (
    SamplingConfig,
    draw,
    min_p_filter,
    process_logits,
    sample_generators,
    top_k_filter,
    top_p_filter,
)

B, V = 6, 40


def _logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 2.0
    x[0, 5:] = float("-inf")  # a row with masked entries (as image-mode masking produces)
    return x


def _kept(x):
    return [set(i for i in range(V) if x[r, i] != float("-inf")) for r in range(x.shape[0])]


def _softmax_row(row):
    m = max(v for v in row if v != float("-inf"))
    e = [math.exp(v - m) if v != float("-inf") else 0.0 for v in row]
    s = sum(e)
    return [v / s for v in e]


def brute_top_k(x, k):
    out = []
    for row in x.tolist():
        finite = sorted((v for v in row if v != float("-inf")), reverse=True)
        kth = finite[min(k, len(finite)) - 1]
        out.append({i for i, v in enumerate(row) if v >= kth and v != float("-inf")})
    return out


def brute_top_p(x, p):
    out = []
    for row in x.tolist():
        probs = _softmax_row(row)
        order = sorted(range(V), key=lambda i: -probs[i])
        keep, mass = set(), 0.0
        for i in order:
            keep.add(i)
            mass += probs[i]
            if mass >= p:
                break
        out.append(keep)
    return out


def brute_min_p(x, mp):
    out = []
    for row in x.tolist():
        probs = _softmax_row(row)
        top = max(probs)
        out.append({i for i in range(V) if probs[i] > 0 and probs[i] >= mp * top})
    return out


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_matches_brute_force_and_hf(k):
    from transformers import TopKLogitsWarper

    x = _logits(1)
    assert _kept(top_k_filter(x, k)) == brute_top_k(x, k)
    hf = TopKLogitsWarper(top_k=k)(None, x.clone())
    assert _kept(top_k_filter(x, k)) == _kept(hf)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_top_p_matches_brute_force_and_hf(p):
    from transformers import TopPLogitsWarper

    x = _logits(2)
    mine = _kept(top_p_filter(x, p))
    assert mine == brute_top_p(x, p)
    assert mine == _kept(TopPLogitsWarper(top_p=p)(None, x.clone()))
    assert all(len(s) >= 1 for s in mine)


@pytest.mark.parametrize("mp", [0.03, 0.2, 0.6])
def test_min_p_matches_brute_force_and_hf(mp):
    from transformers import MinPLogitsWarper

    x = _logits(3)
    mine = _kept(min_p_filter(x, mp))
    assert mine == brute_min_p(x, mp)
    assert mine == _kept(MinPLogitsWarper(min_p=mp)(None, x.clone()))


def test_chain_matches_hf_warper_chain():
    from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = _logits(4)
    cfg = SamplingConfig(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05)
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9),
                              MinPLogitsWarper(0.05)])(None, x.clone())
    mine = process_logits(x, cfg)
    assert _kept(mine) == _kept(hf)
    finite = mine != float("-inf")
    assert torch.allclose(mine[finite], hf[finite], atol=1e-6)


def test_draw_is_inverse_cdf_of_processed_distribution():
    """Each token equals a brute-force inverse-CDF draw with the same per-sample uniform."""
    x = _logits(5)
    cfg = SamplingConfig(temperature=1.3, top_k=0, top_p=0.9, min_p=0.03)
    ids = [11, 12, 13, 14, 15, 16]
    tok = draw(x, cfg, sample_generators(7, ids))
    us = [torch.rand(1, generator=g, dtype=torch.float64).item() for g in sample_generators(7, ids)]
    keep_p = brute_top_p(x / 1.3, 0.9)
    for r in range(B):
        row = (x[r] / 1.3).tolist()
        row = [v if i in keep_p[r] else float("-inf") for i, v in enumerate(row)]
        probs = _softmax_row(row)
        top = max(probs)
        probs = [p if p >= 0.03 * top else 0.0 for p in probs]
        target, acc, choice = us[r] * sum(probs), 0.0, None
        for i, p in enumerate(probs):
            acc += p
            if acc > target:
                choice = i
                break
        assert tok[r].item() == choice
        assert probs[tok[r].item()] > 0


def test_draw_frequencies_follow_min_p_distribution():
    """Empirical frequencies of 20k seeded draws match the min-p-filtered softmax (chi-square-ish bound)."""
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -6.0]])
    cfg = SamplingConfig(temperature=1.0, min_p=0.03)
    n = 20000
    counts = torch.zeros(5)
    gens = sample_generators(3, range(n))
    toks = torch.cat([draw(x, cfg, [g]) for g in gens])
    counts += torch.bincount(toks, minlength=5).float()
    p = torch.softmax(x[0], 0)
    p = torch.where(p >= 0.03 * p.max(), p, torch.zeros_like(p))
    p = p / p.sum()
    assert counts[4] == 0  # below min-p: never sampled
    freq = counts / n
    assert torch.all((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / n) + 1e-9)


def test_seeding_is_per_sample():
    x = _logits(6)
    cfg = SamplingConfig(min_p=0.0)
    a = draw(x, cfg, sample_generators(9, range(B)))
    # Same samples, reversed batch order: each row keeps its token.
    b = draw(x.flip(0), cfg, sample_generators(9, reversed(range(B))))
    assert torch.equal(a, b.flip(0))
    many = torch.stack([draw(x, cfg, sample_generators(s, range(B))) for s in range(20)])
    assert len({tuple(r.tolist()) for r in many}) > 1


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1).validate()
