"""XOmniModel's scoring options (`logits_from`, `only_head`) against its full forward.

One rank, the tiny model with vision blocks, non-degenerate weights, a batch mixing text and
image tokens: the sliced / single-head logits and losses must be the full forward's values at
the kept positions (computed over fewer rows, so equal to fp32 rounding), the skipped head's
targets get loss 0, and bad options are refused.
"""

import torch

from tests.multirank import run_ranks

TEXT_V, START = 512, 9


def _rank(rank, world):
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    pg = initialize_parallel(ParallelConfig(), seed=0)
    (model,) = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    model.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    text = torch.randint(0, TEXT_V, (3, 41), generator=g)
    image = TEXT_V + torch.randint(0, 256, (3, 41), generator=g)
    ids = torch.where(torch.arange(41) % 7 >= 3, image, text)
    tokens, labels, pos = ids[:, :-1], ids[:, 1:], torch.arange(40).expand(3, 40)
    out = {}
    with torch.no_grad():
        out["full"] = model(tokens, pos, None)
        out["full_loss"] = model(tokens, pos, None, labels=labels)
        out["from"] = model(tokens, pos, None, logits_from=START)
        out["image_only"] = model(tokens, pos, None, logits_from=START, only_head="image")
        out["text_only"] = model(tokens, pos, None, only_head="text")
        out["loss_from"] = model(tokens, pos, None, labels=labels, logits_from=START)
        out["loss_image"] = model(tokens, pos, None, labels=labels, logits_from=START, only_head="image")
        out["loss_text"] = model(tokens, pos, None, labels=labels, only_head="text")
        try:
            model(tokens, pos, None, only_head="audio")
            out["bad"] = None
        except ValueError as e:
            out["bad"] = str(e)
    out["is_image"] = labels >= TEXT_V
    return out


def _close(a, b):
    """Equal shapes, -inf (masked slots) at the same places, finite values equal to fp32 rounding."""
    assert a.shape == b.shape
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    assert ((a[finite] - b[finite]).abs().max() / b[finite].abs().max()).item() <= 1e-6


def test_scoring_options_give_the_full_forward_values():
    (r,) = run_ranks(_rank, 1)
    text, image = r["full"]
    _close(r["from"][0], text[:, START:])
    _close(r["from"][1], image[:, START:])
    assert r["image_only"][0] is None
    _close(r["image_only"][1], image[:, START:])
    assert r["text_only"][1] is None
    _close(r["text_only"][0], text)
    full, is_image = r["full_loss"], r["is_image"]
    assert is_image.any() and (~is_image).any()
    _close(r["loss_from"], full[:, START:])
    _close(r["loss_image"], torch.where(is_image, full, 0.0)[:, START:])
    _close(r["loss_text"], torch.where(is_image, 0.0, full))
    assert "only_head" in r["bad"]
