"""SigLIP ViT encoder with an any-resolution learned position grid.

The patch embedding and the transformer blocks are `transformers`' own SigLIP modules, so a
SigLIP / SigLIP2 vision checkpoint loads by name. What is ours: resizing the square position
grid to each image's (H/p, W/p) grid, and taking the last block's output *before*
`post_layernorm` (X-Omni quantizes those features).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

from megatron_xomni.data.image_grid import ImageGrid
from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig

logger = logging.getLogger(__name__)

# Checkpoint key prefixes that hold the vision tower: a full SiglipModel / Siglip2Model
# (and transformers<5 SiglipVisionModel) nest it under `vision_model.`; transformers>=5
# SiglipVisionModel saves it at the top level.
_VISION_PREFIX = "vision_model."
_OWN_PREFIXES = ("embeddings.", "encoder.")


def hf_vision_config(cfg: SigLIPVQConfig) -> SiglipVisionConfig:
    """The `transformers` config that builds blocks of the shape `cfg` describes."""
    hf = SiglipVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_channels=cfg.num_channels,
        image_size=cfg.pos_grid * cfg.patch_size,  # makes SiglipVisionEmbeddings allocate pos_grid^2 rows
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        attention_dropout=0.0,
    )
    hf._attn_implementation = cfg.attn_implementation
    return hf


def resize_position_grid(
    table: torch.Tensor, grid: int, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False
) -> torch.Tensor:
    """Resize a [grid*grid, D] raster-order position table to [h*w, D] for an (h, w) patch grid.

    Same convention as `transformers` (SigLIP `interpolate_pos_encoding`, SigLIP2 naflex) and
    X-Omni: `F.interpolate` with `align_corners=False`, the native grid returned untouched.
    """
    h, w = size
    if (h, w) == (grid, grid):
        return table
    dim = table.shape[-1]
    image = table.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    # bicubic/bilinear are not implemented for every low-precision dtype on every backend.
    image = image.float()
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(image, size=(h, w), mode=mode, align_corners=align,
                        antialias=antialias if mode in ("bilinear", "bicubic") else False)
    return out.permute(0, 2, 3, 1).reshape(h * w, dim).to(table.dtype)


class SiglipViTEncoder(nn.Module):
    """pixels [B, C, H, W] -> last-block features [B, (H/p)*(W/p), width] (no post_layernorm)."""

    def __init__(self, cfg: SigLIPVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hf_cfg = hf_vision_config(cfg)
        # Module names match SiglipVisionModel so its state dict loads without renaming.
        self.embeddings = SiglipVisionEmbeddings(hf_cfg)
        self.encoder = SiglipEncoder(hf_cfg)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # SigLIP's init: lecun-normal linears/conv, N(0, 1/width) positions (random start only;
        # real runs load a pretrained SigLIP).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=1.0 / math.sqrt(self.cfg.width))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid; one-line ValueError unless both sides are multiples of the patch."""
        return ImageGrid.from_pixels(height, width, self.cfg.patch_size).shape

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """[h*w, width] position embeddings for an (h, w) patch grid."""
        return resize_position_grid(self.embeddings.position_embedding.weight, self.cfg.pos_grid, (h, w),
                                    self.cfg.pos_resize_mode, self.cfg.pos_resize_antialias)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if pixels.ndim != 4 or pixels.shape[1] != self.cfg.num_channels:
            raise ValueError(f"pixels must be [B, {self.cfg.num_channels}, H, W], got {tuple(pixels.shape)}")
        h, w = self.grid_size(pixels.shape[2], pixels.shape[3])
        conv = self.embeddings.patch_embedding
        x = conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)  # [B, h*w, width], raster order
        x = x + self.position_embeddings(h, w).to(x.dtype)
        use_ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layers:
            x = checkpoint(layer, x, None, use_reentrant=False) if use_ckpt else layer(x, None)
        return x, (h, w)

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def load_hf_weights(self, path: str | Path, resize_grid: bool = True) -> None:
        """Load a local SigLIP / SigLIP2 vision checkpoint (safetensors; file, dir, or sharded dir).

        Accepts `SiglipVisionModel` keys (`embeddings.*`, `encoder.*`, with or without a
        `vision_model.` prefix) and a full `SiglipModel` / `Siglip2Model` (its `vision_model.*`).
        SigLIP2's Linear patch embedding over (py, px, c)-flattened patches is reshaped into the
        equivalent Conv2d. A position grid of another size is resized once to `pos_grid` with
        `pos_resize_mode` (how X-Omni grew a 384 px grid to 2048 px) when `resize_grid` is set.
        """
        state = _read_vision_state(Path(path))
        p, c = self.cfg.patch_size, self.cfg.num_channels
        key = "embeddings.patch_embedding.weight"
        if key in state and state[key].ndim == 2:  # SigLIP2 naflex: Linear(c*p*p -> width)
            wt = state[key]
            if wt.shape[1] != c * p * p:
                raise ValueError(f"checkpoint patch embedding {tuple(wt.shape)} does not fit patch_size={p}, "
                                 f"num_channels={c}; set them to the checkpoint's values")
            state[key] = wt.reshape(wt.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()
        pos_key = "embeddings.position_embedding.weight"
        if pos_key in state and state[pos_key].shape[0] != self.cfg.num_positions:
            rows = state[pos_key].shape[0]
            src = math.isqrt(rows)
            if src * src != rows or not resize_grid:
                raise ValueError(f"checkpoint has {rows} positions, config pos_grid={self.cfg.pos_grid} needs "
                                 f"{self.cfg.num_positions}; set pos_grid to {src} or pass resize_grid=True")
            logger.info("resizing checkpoint position grid %dx%d -> %dx%d (%s)", src, src,
                        self.cfg.pos_grid, self.cfg.pos_grid, self.cfg.pos_resize_mode)
            state[pos_key] = resize_position_grid(state[pos_key], src, (self.cfg.pos_grid,) * 2,
                                                  self.cfg.pos_resize_mode, self.cfg.pos_resize_antialias)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} encoder tensors, e.g. {missing[:3]}; "
                             "is it a SigLIP vision checkpoint with num_layers matching the config?")
        for name, value in own.items():
            if state[name].shape != value.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, the config "
                                 f"expects {tuple(value.shape)}; build the config with config_from_hf({path!s})")
            value.copy_(state[name].to(value.dtype))


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors checkpoints are supported")
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file under {path}; save the SigLIP model with safe_serialization")
    return files


def _read_vision_state(path: Path) -> dict[str, torch.Tensor]:
    """Vision-tower tensors, renamed to this encoder's keys (post_layernorm/head/text dropped)."""
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = key[len(_VISION_PREFIX):] if key.startswith(_VISION_PREFIX) else key
                if name.startswith(_OWN_PREFIXES) and "position_ids" not in name:
                    state[name] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{path} holds no SigLIP vision tensors (expected 'embeddings.*' / "
                         "'vision_model.embeddings.*' keys)")
    return state


def config_from_hf(path: str | Path, **overrides: Any) -> SigLIPVQConfig:
    """A SigLIPVQConfig whose encoder matches a local SigLIP/SigLIP2 checkpoint's config.json.

    Quantizer/adapter fields come from `overrides` (or the dataclass defaults). SigLIP2 naflex
    checkpoints default to their own position-resize rule (bilinear, antialias).
    """
    cfg_path = Path(path)
    cfg_path = cfg_path / "config.json" if cfg_path.is_dir() else cfg_path.parent / "config.json"
    data = json.loads(cfg_path.read_text())
    model_type = data.get("model_type", "")
    vision = data.get("vision_config", data)
    fields: dict[str, Any] = dict(
        width=vision["hidden_size"], num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
        patch_size=vision["patch_size"], num_channels=vision.get("num_channels", 3),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_act=vision.get("hidden_act", "gelu_pytorch_tanh"),
    )
    if "num_patches" in vision or model_type.startswith("siglip2"):
        fields.update(pos_grid=math.isqrt(vision.get("num_patches", 256)),
                      pos_resize_mode="bilinear", pos_resize_antialias=True)
    else:
        fields.update(pos_grid=vision["image_size"] // vision["patch_size"], pos_resize_mode="bicubic")
    fields.update(overrides)
    return SigLIPVQConfig(**fields)
