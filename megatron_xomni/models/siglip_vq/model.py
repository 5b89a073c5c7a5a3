"""SiglipVQTokenizer: SigLIP ViT -> 1x1 conv -> index-backprop VQ -> conv adapter.

    codes = tok.encode(pixels)                 # [B, H/p, W/p] LongTensor
    feats = tok.decode_features(codes)         # [B, (H/p)*(W/p), adapter_dim]
    feats, aux = tok(pixels)                   # training: aux["loss"] joins the task loss

pixels are [B, C, H, W] floats normalised with mean = std = 0.5 (values in [-1, 1]), H and W
multiples of patch_size; every image of a batch shares one size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_xomni.file_checks import BadFile, check_safetensors, read_json, require_dir
from megatron_xomni.models.siglip_vq.adapter import ConvAdapter
from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig
from megatron_xomni.models.siglip_vq.encoder import SiglipViTEncoder
from megatron_xomni.models.siglip_vq.quantizer import IndexBackpropQuantizer, nearest_code

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# config.json fields that fix the weight shapes: a file without them cannot describe its weights
SHAPE_FIELDS = ("patch_size", "width", "num_layers", "num_heads", "mlp_dim", "pos_grid", "codebook_size",
                "codebook_dim", "adapter_dim")


class SiglipVQTokenizer(nn.Module):
    """The X-Omni semantic image tokenizer (see megatron_xomni.models.siglip_vq.config for its fields)."""

    def __init__(self, cfg: SigLIPVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SiglipViTEncoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.width, cfg.codebook_dim, 1)
        self.quantizer = IndexBackpropQuantizer(cfg)
        self.adapter = ConvAdapter(cfg)
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "SiglipVQTokenizer":
        super().train(mode)
        if self.cfg.freeze_encoder:
            self.encoder.eval()  # a frozen encoder never switches to training behaviour
        return self

    # ------------------------------------------------------------------ pieces
    def pre_quant_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder features mapped to the code space: [B, h*w, codebook_dim] (not normalised)."""
        if self.cfg.freeze_encoder:
            with torch.no_grad():
                feats, grid = self.encoder(pixels)
        else:
            feats, grid = self.encoder(pixels)
        b, n, c = feats.shape
        x = feats.transpose(1, 2).reshape(b, c, *grid).to(self.quant_conv.weight.dtype)
        return self.quant_conv(x).flatten(2).transpose(1, 2), grid

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> nearest-code indices [B, H/p, W/p] (always hard, never skipped)."""
        z, (h, w) = self.pre_quant_features(pixels)
        z = torch.nn.functional.normalize(z, dim=-1)
        codes = nearest_code(z.reshape(-1, z.shape[-1]), self.quantizer.normalized_codebook(),
                             self.cfg.search_chunk_size)
        return codes.reshape(z.shape[0], h, w)

    def decode_features(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> adapter features [B, h*w, adapter_dim], raster order."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, h, w], got shape {tuple(codes.shape)}; "
                             "reshape flat token sequences to their grid first")
        b, h, w = codes.shape
        q = self.quantizer.lookup(codes.reshape(b, h * w)).to(self.adapter.post_quant_conv.weight.dtype)
        return self.adapter(q, (h, w))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training/eval pass: (adapter features [B, N, adapter_dim], aux).

        aux: loss (add to the task loss), index_loss, codebook_loss, commitment_loss (beta applied),
        codes [B, h, w], skip_mask [B], usage_fraction and perplexity of this batch, grid (h, w).
        """
        z, grid = self.pre_quant_features(pixels)
        out = self.quantizer(z)
        feats = self.adapter(out.quantized.to(self.adapter.post_quant_conv.weight.dtype), grid)
        aux = {
            "loss": out.loss,
            "index_loss": out.index_loss,
            "codebook_loss": out.codebook_loss,
            "commitment_loss": out.commitment_loss,
            "codes": out.codes.reshape(z.shape[0], *grid),
            "skip_mask": out.skip_mask,
            "usage_fraction": out.usage_fraction,
            "perplexity": out.perplexity,
            "grid": grid,
        }
        return feats, aux

    # ------------------------------------------------------------------ checkpoints
    def load_siglip_weights(self, path: str | Path, resize_grid: bool = True) -> None:
        """Initialise the encoder from a local SigLIP / SigLIP2 safetensors checkpoint."""
        self.encoder.load_hf_weights(path, resize_grid=resize_grid)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors (all tokenizer weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.save(directory / CONFIG_NAME)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        **overrides: Any) -> "SiglipVQTokenizer":
        """Load what save_pretrained wrote; `overrides` change config fields (e.g. freeze_encoder)."""
        directory = Path(directory)
        cfg = SigLIPVQConfig.from_dict({**check_pretrained(directory).to_dict(), **overrides})
        model = cls(cfg)
        try:
            model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(device)), strict=True)
        except RuntimeError as e:  # names or shapes that do not fit config.json
            first = str(e).strip().splitlines()[-1].strip()
            raise BadFile(f"image tokenizer weights {directory / WEIGHTS_NAME} do not fit its {CONFIG_NAME} "
                          f"({first}); save config and weights together with save_pretrained") from None
        return model.to(device)


def check_pretrained(directory: str | Path) -> SigLIPVQConfig:
    """The config of a save_pretrained folder after checking config.json (JSON with the shape fields) and
    model.safetensors (a readable header); BadFile (one line) names the first bad file."""
    fix = "write the image tokenizer with SiglipVQTokenizer.save_pretrained"
    d = require_dir(directory, "image tokenizer folder", fix)
    data = read_json(d / CONFIG_NAME, "image tokenizer config", fix, required=SHAPE_FIELDS)
    try:
        cfg = SigLIPVQConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise BadFile(f"image tokenizer config {d / CONFIG_NAME}: {e}") from None
    check_safetensors(d / WEIGHTS_NAME, "image tokenizer weights", fix)
    return cfg
