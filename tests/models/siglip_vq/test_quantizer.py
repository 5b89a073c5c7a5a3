"""Index-backprop quantizer against brute-force / closed-form references written here."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_xomni.models.siglip_vq import IndexBackpropQuantizer, code_stats, nearest_code, tokenizer_config


def _quantizer(**overrides):
    torch.manual_seed(0)
    cfg = tokenizer_config("tiny", **{"codebook_size": 50, "codebook_dim": 8, "search_chunk_size": 7,
                                      "reseed_buffer_size": 64, **overrides})
    return IndexBackpropQuantizer(cfg)


@pytest.mark.parametrize("chunk,max_scores", [(1, 1), (5, 20), (5, 1 << 24), (64, 100), (4096, 1 << 24)])
def test_nearest_code_equals_brute_force(chunk, max_scores):
    torch.manual_seed(0)
    z = F.normalize(torch.randn(67, 12, dtype=torch.float64), dim=-1)
    codes = F.normalize(torch.randn(45, 12, dtype=torch.float64), dim=-1)
    want = []
    for row in z:  # explicit loop over features, squared Euclidean distance to every code
        dists = [float(((row - c) ** 2).sum()) for c in codes]
        want.append(min(range(len(dists)), key=dists.__getitem__))
    got = nearest_code(z, codes, chunk_size=chunk, max_scores=max_scores)  # row/code blocks of all sizes
    assert got.tolist() == want
    assert torch.equal(got, torch.cdist(z, codes).argmin(dim=1))


def test_nearest_code_fp32_and_bf16_inputs_are_scored_in_fp32():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(300, 16), dim=-1)
    codes = F.normalize(torch.randn(200, 16), dim=-1)
    ref = torch.cdist(z.double(), codes.double()).argmin(1)
    assert torch.equal(nearest_code(z, codes, 33), ref)
    # bf16 rounding breaks unit norm slightly; the contract is argmax of the (fp32-accurate) dot product.
    got = nearest_code(z.bfloat16(), codes.bfloat16(), 33)
    ref16 = (z.bfloat16().double() @ codes.bfloat16().double().T).argmax(1)
    assert torch.equal(got, ref16)


def test_forward_codes_losses_and_eval_value():
    q = _quantizer(skip_quant_prob=0.0).eval()
    feats = torch.randn(3, 10, 8)
    out = q(feats)
    z = F.normalize(feats, dim=-1)
    e = F.normalize(q.codebook.detach(), dim=-1)
    ref_codes = torch.cdist(z.reshape(-1, 8), e).argmin(1)
    assert torch.equal(out.codes.flatten(), ref_codes)
    eh = e[ref_codes].reshape(3, 10, 8)
    torch.testing.assert_close(out.quantized, eh)
    mse = ((z - eh) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, 0.25 * mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    torch.testing.assert_close(out.index_loss, mse)
    torch.testing.assert_close(out.loss, 2.25 * mse)


def test_straight_through_gradients_match_explicit_one_hot_reference():
    q = _quantizer(skip_quant_prob=0.0, quant_temperature=2.0).train()
    feats = torch.randn(2, 9, 8, requires_grad=True)
    upstream = torch.randn(2, 9, 8)
    out = q(feats)
    ((out.quantized * upstream).sum() + out.loss).backward()
    got_f, got_c = feats.grad.clone(), q.codebook.grad.clone()
    assert got_f.abs().sum() > 0 and got_c.abs().sum() > 0

    # Reference: explicit distances, softmax(-d/tau), one_hot = hard - sg(soft) + soft.
    feats2 = feats.detach().clone().requires_grad_(True)
    book = q.codebook.detach().clone().requires_grad_(True)
    z = F.normalize(feats2, dim=-1).reshape(-1, 8)
    e = F.normalize(book, dim=-1)
    d = ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    soft = torch.softmax(-d / 2.0, dim=1)
    hard = F.one_hot(d.argmin(1), e.shape[0]).to(soft.dtype)
    zq = (hard - soft.detach() + soft) @ e
    eh = hard @ e
    loss = ((zq - z) ** 2).mean() + ((eh - z.detach()) ** 2).mean() + 0.25 * ((z - eh.detach()) ** 2).mean()
    ((zq.reshape(2, 9, 8) * upstream).sum() + loss).backward()
    torch.testing.assert_close(out.quantized.detach(), eh.detach().reshape(2, 9, 8))
    torch.testing.assert_close(got_f, feats2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_c, book.grad, atol=1e-5, rtol=1e-4)
    # Index backprop: codes that were *not* chosen still receive gradient through the soft weights.
    unused = torch.ones(50, dtype=torch.bool)
    unused[out.codes.flatten()] = False
    assert unused.any() and got_c[unused].abs().sum(1).gt(0).all()


def test_skip_probability_one_and_zero():
    feats = torch.randn(4, 6, 8)
    q = _quantizer(skip_quant_prob=1.0).train()
    out = q(feats)
    assert out.skip_mask.all()
    torch.testing.assert_close(out.quantized, F.normalize(feats, dim=-1))
    q = _quantizer(skip_quant_prob=0.0).train()
    out = q(feats)
    assert not out.skip_mask.any()
    torch.testing.assert_close(out.quantized, F.normalize(q.codebook.detach(), dim=-1)[out.codes])


def test_skip_fraction_is_per_sample_and_near_p():
    torch.manual_seed(3)
    q = _quantizer(skip_quant_prob=0.1, reseed_buffer_size=0).train()
    feats = torch.randn(4000, 2, 8)
    out = q(feats)
    frac = out.skip_mask.float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 4000)
    z = F.normalize(feats, dim=-1)
    e = F.normalize(q.codebook.detach(), dim=-1)[out.codes]
    skipped = out.skip_mask
    torch.testing.assert_close(out.quantized[skipped], z[skipped])
    torch.testing.assert_close(out.quantized[~skipped], e[~skipped])
    # Eval never skips.
    assert not q.eval()(feats).skip_mask.any()


def test_usage_statistics_closed_form():
    counts = torch.tensor([3, 0, 1, 0, 4])
    usage, ppl = code_stats(counts)
    p = torch.tensor([3, 1, 4]) / 8.0
    assert usage.item() == pytest.approx(3 / 5)
    assert ppl.item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert code_stats(torch.tensor([2, 2, 2, 2]))[1].item() == pytest.approx(4.0)

    q = _quantizer().train()
    out1, out2 = q(torch.randn(2, 5, 8)), q(torch.randn(1, 7, 8))
    all_codes = torch.cat([out1.codes.flatten(), out2.codes.flatten()])
    want = torch.bincount(all_codes, minlength=50)
    assert torch.equal(q.code_counts, want)
    stats = q.usage_stats()
    assert stats["tokens"] == 17
    assert stats["usage_fraction"] == pytest.approx((want > 0).float().mean().item())
    batch_p = torch.bincount(out2.codes.flatten(), minlength=50).double() / 7
    nz = batch_p[batch_p > 0]
    assert out2.perplexity.item() == pytest.approx(math.exp(-(nz * nz.log()).sum().item()), rel=1e-5)


def test_reseed_dead_codes_moves_them_onto_recent_features():
    q = _quantizer(reseed_buffer_size=64, skip_quant_prob=0.0).train()
    feats = torch.randn(4, 8, 8)
    out = q(feats)
    used = torch.zeros(50, dtype=torch.bool)
    used[out.codes.flatten()] = True
    before = q.codebook.detach().clone()
    dead = q.reseed_dead_codes(min_count=1, generator=torch.Generator().manual_seed(0))
    assert set(dead.tolist()) == set((~used).nonzero().flatten().tolist())
    torch.testing.assert_close(q.codebook.detach()[used], before[used])  # live codes untouched
    z = F.normalize(feats, dim=-1).reshape(-1, 8)
    for k in dead.tolist():  # each dead code now *is* one of the batch's features
        assert (q.codebook.detach()[k] - z).abs().amax(dim=1).min() < 1e-6
    assert len({tuple(q.codebook.detach()[k].tolist()) for k in dead.tolist()}) == len(dead)  # distinct
    assert q.code_counts.sum() == 0  # counts reset
    with pytest.raises(ValueError, match="no recent features"):
        _quantizer().reseed_dead_codes()
