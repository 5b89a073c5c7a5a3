"""SigLIP pairwise-sigmoid contrastive pre-training pieces: a small text tower, the attention-pool image
head, and the loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

X-Omni quantizes a *pretrained* SigLIP2, whose features already encode colour, shape and count. The
tiny preset has no such checkpoint, so its ViT is pre-trained here on the corpus captions first (the
tiny analogue; the full-size recipe loads SigLIP2 weights with `tokenizer.siglip_path` instead).

    loss = -1/B * sum_ij log sigmoid(z_ij * (exp(t) * <x_i, y_j> + b)),   z_ij = +1 if caption j is
                                                                          image i's caption, else -1

x_i, y_j are unit-normalised image / text embeddings, t (log temperature) and b (bias) are learned
scalars initialised to log 10 and -10 as in the paper. Two images with the same caption text are both
positives of it (the tiny world repeats captions; counting them as negatives would push apart the
embeddings of identical texts).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sigmoid_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, log_scale: torch.Tensor,
                             bias: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP loss of unit-normalised [B, D] image and [B, D] text embeddings; positives [B, B] bool
    (row i, column j: text j describes image i)."""
    logits = image_emb @ text_emb.t() * log_scale.exp() + bias
    signs = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / image_emb.shape[0]


class TextTower(nn.Module):
    """Token embedding + learned positions + a pre-norm transformer encoder, mean-pooled over real tokens."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, embed_dim: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.pos.shape[0]:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the text tower's {self.pos.shape[0]} positions")
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=mask == 0))
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp_min(1))


class AttentionPoolHead(nn.Module):
    """SigLIP's image head: one learned probe query attends over the ViT tokens, then a projection."""

    def __init__(self, width: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.norm(feats)
        pooled = self.attn(self.probe.expand(feats.shape[0], -1, -1), x, x, need_weights=False)[0][:, 0]
        return self.head(pooled)


class SiglipContrastiveModel(nn.Module):
    """The trainable part of the contrastive stage: the tokenizer's ViT encoder, the image head, the text
    tower and the two scalars, in one module so DDP and the checkpoint see all of them."""

    def __init__(self, encoder: nn.Module, width: int, heads: int, text_vocab: int, text_width: int,
                 text_layers: int, text_heads: int, embed_dim: int, max_text_tokens: int,
                 init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_head = AttentionPoolHead(width, heads, embed_dim)
        self.text_tower = TextTower(text_vocab, text_width, text_layers, text_heads, embed_dim, max_text_tokens)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        feats, _ = self.encoder(pixels)
        return F.normalize(self.image_head(feats), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(ids, mask), dim=-1)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        return self.embed_images(pixels), self.embed_texts(ids, mask)
