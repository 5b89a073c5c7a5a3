"""The SigLIP pairwise-sigmoid loss against a direct implementation written here: the loss by explicit
loops over pairs, and its gradients in closed form (d/dl of -log sigmoid(z l) = -z sigmoid(-z l))."""

import math

import torch

from megatron_xomni.models.siglip_vq.contrastive import SiglipContrastiveModel, sigmoid_contrastive_loss


def _inputs(b=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    captions = [0, 1, 2, 1, 3, 4, 0]  # images 1 and 3 (and 0 and 6) share a caption: positives of each other
    pos = torch.tensor([[captions[i] == captions[j] for j in range(b)] for i in range(b)])
    return x, y, pos


def _direct_loss(x, y, t, bias, pos):
    b = x.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if pos[i, j] else -1.0
            logit = math.exp(t) * float(x[i] @ y[j]) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / b


def test_loss_and_gradients_match_direct_formulas():
    x, y, pos = _inputs()
    t0, b0 = math.log(7.0), -3.0  # a regime where positives and negatives both carry gradient
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    t, bias = torch.tensor(t0, dtype=torch.float64, requires_grad=True), torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_contrastive_loss(xs.double(), ys.double(), t, bias, pos)
    loss.backward()
    assert abs(loss.item() - _direct_loss(x.double(), y.double(), t0, b0, pos)) < 1e-12

    n = x.shape[0]
    z = pos.double() * 2 - 1
    logits = math.exp(t0) * x.double() @ y.double().t() + b0
    g = -z * torch.sigmoid(-z * logits) / n  # dloss / dlogit_ij
    torch.testing.assert_close(bias.grad, g.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.grad, (g * math.exp(t0) * (x.double() @ y.double().t())).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad.double(), math.exp(t0) * g @ y.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ys.grad.double(), math.exp(t0) * g.t() @ x.double(), rtol=1e-6, atol=1e-7)
    assert (g[pos] < 0).all() and (g[~pos] > 0).all()  # positives pulled together, negatives pushed apart


def test_model_scale_and_bias_are_learnable_and_start_at_siglip_values():
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    torch.manual_seed(0)
    tok = SiglipVQTokenizer(tokenizer_config("tiny", patch_size=8, pos_grid=8))
    m = SiglipContrastiveModel(tok.encoder, 64, 2, text_vocab=50, text_width=32, text_layers=1, text_heads=2,
                               embed_dim=16, max_text_tokens=12)
    assert abs(m.log_scale.exp().item() - 10.0) < 1e-5 and m.bias.item() == -10.0
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    ids = torch.randint(1, 50, (4, 9))
    mask = torch.ones(4, 9)
    mask[1, 5:] = 0
    img, txt = m(pixels, ids, mask)
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    loss = sigmoid_contrastive_loss(img, txt, m.log_scale, m.bias, torch.eye(4, dtype=torch.bool))
    loss.backward()
    assert m.log_scale.grad is not None and m.bias.grad.abs() > 0
    assert all(p.grad is not None for p in tok.encoder.parameters() if p.requires_grad)
    # padding is ignored: changing a padded id leaves the text embedding unchanged
    ids2 = ids.clone()
    ids2[1, 7] = 3
    torch.testing.assert_close(m.embed_texts(ids2, mask)[1], m.embed_texts(ids, mask)[1])
