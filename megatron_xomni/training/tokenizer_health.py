"""Is the image tokenizer healthy? Numbers that say whether its codes carry what the world asks for.

- `caption_gap_pct(eval)`: how much worse the frozen teacher captions an image when it sees *another*
  image's codes (the SigLIP-VQ eval's shuffled-image loss minus right-image loss, in % of the latter).
  About 0 means the codes tell the LLM nothing (issue 11: the tokenizer before the fix).
- `probe_report(tok, ...)`: linear-probe accuracy from the codes (their adapter features, what the
  decoder and the AR model see) on held-out world images: the colour of object tokens, the shape
  (single-object images, pooled features), the object count (counting skill, pooled) and the 3x3
  position cell (single-object images, all tokens); plus code usage and perplexity over those images,
  for all tokens and for object tokens (most tokens are background and most codes can go there).

Probes are multinomial logistic regressions fitted with torch's L-BFGS (standardised inputs, L2).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from megatron_xomni.data.corpus_source import pil_to_pixels
from megatron_xomni.data.world_source import world_image_labels, world_probe_samples, world_token_colours

SHAPE_SKILLS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")


def caption_gap_pct(ev: dict) -> float:
    """100 * (shuffled-image caption loss - right-image loss) / right-image loss, from an eval dict."""
    return 100.0 * (float(ev["loss_shuffled"]) - float(ev["loss"])) / float(ev["loss"])


def logistic_probe(x_train, y_train, x_test, y_test, l2: float = 1e-3, iters: int = 200) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features."""
    xtr, xte = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32)
    ytr, yte = torch.as_tensor(y_train, dtype=torch.long), torch.as_tensor(y_test, dtype=torch.long)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-4)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    k = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros(xtr.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == yte).float().mean())


def usage(codes: torch.Tensor, codebook_size: int) -> dict:
    """Fraction of the codebook used, perplexity exp(H) of the code histogram, distinct codes."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp()),
            "distinct": int((counts > 0).sum())}


@torch.no_grad()
def _features(tok, samples, batch: int = 256):
    feats, codes = [], []
    for s in range(0, len(samples), batch):
        c = tok.encode(pil_to_pixels([x.image for x in samples[s:s + batch]]))
        codes.append(c.flatten(1))
        feats.append(tok.decode_features(c).float())
    return torch.cat(feats), torch.cat(codes)


def _labelled(x: torch.Tensor, y: np.ndarray):
    keep = y >= 0
    return x[torch.as_tensor(keep)], y[keep]


@torch.no_grad()
def probe_report(tok, image_size: int = 64, n_train: int = 1500, n_test: int = 300, seed: int = 0) -> dict:
    """Linear probes (colour, shape, count, position) and code usage of a tokenizer on the world's
    detector-scored skills; train images from the training stream, test images held out."""
    was = tok.training
    tok.eval()
    train, test = world_probe_samples(n_train, n_test, image_size, seed, SHAPE_SKILLS)
    ftr, _ = _features(tok, train)
    fte, cte = _features(tok, test)
    patch = int(tok.cfg.patch_size)
    ctr_lab, cte_lab = world_token_colours(train, patch), world_token_colours(test, patch)
    with torch.enable_grad():
        out = {"colour": logistic_probe(*_labelled(ftr.reshape(-1, ftr.shape[-1]), ctr_lab.reshape(-1)),
                                        *_labelled(fte.reshape(-1, fte.shape[-1]), cte_lab.reshape(-1)))}
        for name, ytr, yte, pooled in zip(("shape", "count", "position"), world_image_labels(train), world_image_labels(test),
                                          (True, True, False)):
            xtr, xte = (ftr.mean(1), fte.mean(1)) if pooled else (ftr.flatten(1), fte.flatten(1))
            out[name] = logistic_probe(*_labelled(xtr, ytr), *_labelled(xte, yte), l2=1e-3 if pooled else 1e-2)
    k = int(tok.cfg.codebook_size)
    obj = cte.reshape(-1)[torch.as_tensor(cte_lab.reshape(-1) >= 0)]
    out["codes_all"] = usage(cte, k)
    out["codes_object_tokens"] = usage(obj, k)
    out["background_token_share"] = float((cte_lab == -2).mean())
    out["grid"] = [int(math.isqrt(cte.shape[1]))] * 2
    tok.train(was)
    return out
