"""A small pixel decoder for *inspecting* what the frozen tokenizer's codes keep.

X-Omni decodes tokens with a FLUX diffusion decoder (megatron_xomni.models.flux_decoder); this is not that. It is
a cheap conv upsampler, adapter features [B, h*w, adapter_dim] -> image [B, 3, h*p, w*p] (p = the
patch size, 16), trained with an L1 and/or L2 pixel loss on the frozen tokenizer's codes, so one can
look at reconstructions and put a number (PSNR) on how much pixel information survives quantization.
A semantic tokenizer is not trained to reconstruct, so expect blurry, colour/layout-level images.

    dec = PixelDecoder(PixelDecoderConfig(in_dim=tok.cfg.adapter_dim, patch_size=tok.cfg.patch_size))
    feats = tokenizer_features(tok, pixels)          # frozen: encode -> decode_features
    losses = train_pixel_decoder(dec, feats, pixels, steps=300)
    psnr(dec(feats), pixels)                         # dB, images in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_xomni.data.image_grid import ImageGrid

CONFIG_NAME = "pixel_decoder.json"
WEIGHTS_NAME = "pixel_decoder.safetensors"
LOSSES = ("l1", "l2", "l1+l2")


@dataclass
class PixelDecoderConfig:
    """Shape of the sub-pixel conv upsampler (two PixelShuffle stages, token grid -> pixels)."""

    in_dim: int = 64
    """Channels of the tokenizer adapter features (SigLIPVQConfig.adapter_dim)."""
    patch_size: int = 16
    """Pixels per token side; a perfect square (upsampled in two stages of sqrt(patch_size) each)."""
    token_channels: int = 64
    """Width of the residual conv blocks at token resolution (where most of the compute goes)."""
    token_blocks: int = 2
    """Residual conv blocks at token resolution."""
    mid_channels: int = 16
    """Width after the first PixelShuffle (sqrt(patch_size) x the token resolution)."""
    num_groups: int = 8
    """GroupNorm groups (must divide token_channels and mid_channels)."""
    loss: str = "l2"
    """Pixel loss: "l1", "l2" or "l1+l2" (no perceptual term)."""

    def __post_init__(self) -> None:
        if self.patch_size < 1 or math.isqrt(self.patch_size) ** 2 != self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must be a perfect square (4, 16, ...)")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: use one of {LOSSES}")
        if self.token_channels % self.num_groups or self.mid_channels % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide token_channels={self.token_channels} "
                             f"and mid_channels={self.mid_channels}")


class _Block(nn.Module):
    """Residual block: x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x))))))."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PixelDecoder(nn.Module):
    """Adapter features [B, h*w, in_dim] (raster order) + grid (h, w) -> pixels [B, 3, h*p, w*p] in [-1, 1].

    Sub-pixel convolution (Shi et al. 2016): convs run at token resolution, a 1x1 conv makes r*r*C
    channels and PixelShuffle(r) rearranges them into an r-times larger image. Two stages of
    r = sqrt(p) keep full-resolution work to one cheap conv, so CPU training takes seconds.
    """

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        r = math.isqrt(cfg.patch_size)
        self.stem = nn.Conv2d(cfg.in_dim, cfg.token_channels, 1)
        self.token_blocks = nn.Sequential(*[_Block(cfg.token_channels, cfg.num_groups) for _ in range(cfg.token_blocks)])
        self.up1 = nn.Sequential(nn.GroupNorm(cfg.num_groups, cfg.token_channels), nn.SiLU(),
                                 nn.Conv2d(cfg.token_channels, cfg.mid_channels * r * r, 1), nn.PixelShuffle(r))
        self.mid_block = _Block(cfg.mid_channels, cfg.num_groups)
        self.up2 = nn.Sequential(nn.GroupNorm(cfg.num_groups, cfg.mid_channels), nn.SiLU(),
                                 nn.Conv2d(cfg.mid_channels, 3 * r * r, 3, padding=1), nn.PixelShuffle(r))

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = feats.shape
        if c != self.cfg.in_dim:
            raise ValueError(f"features have {c} channels, the decoder expects in_dim={self.cfg.in_dim}")
        h, w = grid if grid is not None else (math.isqrt(n),) * 2
        if h * w != n:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} grid; pass grid=(h, w) for non-square images")
        x = self.token_blocks(self.stem(feats.transpose(1, 2).reshape(b, c, h, w)))
        x = self.mid_block(self.up1(x))
        return torch.tanh(self.up2(x))

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "l1":
            return F.l1_loss(pred, target)
        if self.cfg.loss == "l2":
            return F.mse_loss(pred, target)
        return F.l1_loss(pred, target) + F.mse_loss(pred, target)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PixelDecoder":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} holds no {CONFIG_NAME}; write one with PixelDecoder.save_pretrained")
        model = cls(PixelDecoderConfig(**json.loads((directory / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
        return model


@torch.no_grad()
def tokenizer_features(tok, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """What the frozen tokenizer passes on: decode_features(encode(pixels)) -> [B, h*w, adapter_dim]."""
    tok.eval()
    out = [tok.decode_features(tok.encode(pixels[i: i + batch_size])) for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def train_pixel_decoder(decoder: PixelDecoder, feats: torch.Tensor, pixels: torch.Tensor, steps: int,
                        batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log=None) -> list[float]:
    """Fit the decoder to (feats, pixels) pairs (precomputed features of a frozen tokenizer)."""
    if feats.shape[0] != pixels.shape[0]:
        raise ValueError(f"{feats.shape[0]} feature rows for {pixels.shape[0]} images; compute one per image")
    grid = ImageGrid.from_pixels(pixels.shape[-2], pixels.shape[-1], decoder.cfg.patch_size).shape
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    decoder.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(feats.shape[0], (min(batch_size, feats.shape[0]),), generator=gen)
        loss = decoder.loss(decoder(feats[idx], grid), pixels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % max(1, steps // 10) == 0):
            log(f"[pixel decoder] step {step + 1}/{steps} loss {loss.item():.4f}")
    decoder.eval()
    return losses


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of [B, 3, H, W] images in [-1, 1] (peak = the [0, 1] range)."""
    p = (pred.clamp(-1, 1) + 1) / 2
    t = (target.clamp(-1, 1) + 1) / 2
    mse = (p - t).detach().pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def reconstruct(decoder: PixelDecoder, tok, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels -> frozen tokenizer codes -> decoder reconstruction, same shape as pixels."""
    grid = ImageGrid.from_pixels(pixels.shape[-2], pixels.shape[-1], decoder.cfg.patch_size).shape
    return decoder(tokenizer_features(tok, pixels), grid)


def image_grid(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8):
    """PIL image: rows of originals, each followed by a row of its reconstructions."""
    from PIL import Image

    n, _, h, w = originals.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    canvas = torch.ones(3, rows * 2 * (h + 2), columns * (w + 2))
    for i in range(n):
        r, c = divmod(i, columns)
        for k, img in enumerate((originals[i], reconstructions[i])):
            y, x = (2 * r + k) * (h + 2), c * (w + 2)
            canvas[:, y: y + h, x: x + w] = (img.clamp(-1, 1) + 1) / 2
    arr = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)
