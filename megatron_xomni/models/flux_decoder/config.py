"""Configuration of the offline diffusion decoder (X-Omni section 3: FLUX + semantic adapter)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

VARIANTS = ("text", "image")
PRESETS = ("tiny", "xomni")
OLD_PRESETS = {"full": "xomni"}  # one preset vocabulary for every config: old names are one-line errors
# VAE downsamples 8x and FLUX packs 2x2 latent patches, so one decoder token covers 16x16 px: one
# SigLIP-VQ token of X-Omni (patch 16), or a fold x fold block of a finer tokenizer's (tiny: patch 8).
VAE_SCALE = 8
LATENT_PATCH = 2
TOKEN_PIXELS = VAE_SCALE * LATENT_PATCH


@dataclass
class DecoderConfig:
    """Everything needed to build (or rebuild) a semantic FLUX decoder.

    Saved next to an export as ``decoder_config.json`` so that a checkpoint can be reloaded
    and checked against the variant a caller expects.
    """

    variant: Literal["text", "image"] = "text"
    """"text" keeps FLUX's text stream fed with prompt embeddings (English variant in the paper);
    "image" drops it: zero text tokens and a learned pooled embedding (Chinese variant)."""
    adapter_dim: int = 1536
    """Width of the features fed per decoder token: the tokenizer's adapter_dim x fold^2 (see tokenizer_patch)."""
    tokenizer_patch: int = 16
    """Patch of the image tokenizer whose codes this decoder renders; a divisor of the 16 px decoder token.
    fold = 16 // tokenizer_patch: each fold x fold block of code features is concatenated into one decoder
    token (data/image_grid.py fold_tokens), so the decoder keeps FLUX's latent grid whatever the code grid."""
    # ---- transformer (FluxTransformer2DModel arguments) ----
    num_layers: int = 19
    """Double-stream (MMDiT) blocks; the semantic features are added after the last of them."""
    num_single_layers: int = 38
    """Single-stream blocks, run after the semantic addition."""
    num_attention_heads: int = 24
    """Attention heads; inner width = heads * head_dim (3072 for FLUX.1-dev)."""
    attention_head_dim: int = 128
    """Per-head width; must equal sum(axes_dims_rope)."""
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    """Rotary dims for the (unused, y, x) position axes, as in FLUX."""
    joint_attention_dim: int = 4096
    """Width of the prompt embeddings (T5-XXL hidden size for FLUX)."""
    pooled_projection_dim: int = 768
    """Width of the pooled embedding (CLIP-L pooled output for FLUX)."""
    guidance_embeds: bool = True
    """FLUX.1-dev is guidance-distilled and embeds a guidance scale; tiny models skip it."""
    # ---- VAE (AutoencoderKL arguments) ----
    latent_channels: int = 16
    """VAE latent channels; the transformer sees 4x this (2x2 packing)."""
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Channels per VAE resolution level; 4 levels give the 8x downsampling FLUX assumes."""
    vae_layers_per_block: int = 2
    """Resnet layers per VAE level."""
    vae_norm_num_groups: int = 32
    """GroupNorm groups in the VAE (must divide every entry of vae_block_out_channels)."""
    vae_mid_attention: bool = True
    """Self-attention in the VAE mid block (FLUX has it; the tiny preset drops it for speed)."""
    scaling_factor: float = 0.3611
    """Latent scale: model latents = (vae latents - shift_factor) * scaling_factor."""
    shift_factor: float = 0.1159
    """Latent shift (see scaling_factor)."""
    # ---- prompt encoders (text variant only) ----
    text_encoder: Literal["flux", "tiny"] = "flux"
    """"flux": CLIP-L (pooled) + T5-XXL (sequence) from the FLUX.1-dev folder; "tiny": randomly
    initialised, frozen tiny CLIP + T5 encoders over a byte-level (ByT5) tokenizer, which need no
    downloaded vocabulary. They separate prompts but carry no language knowledge."""
    max_text_tokens: int = 512
    """T5 sequence length (FLUX.1-dev uses 512)."""
    clip_max_tokens: int = 77
    """CLIP sequence length."""
    # ---- sampling defaults (FLUX.1-dev scheduler_config) ----
    num_inference_steps: int = 28
    """Default Euler steps (the paper does not state it; 28 is the FLUX.1-dev default)."""
    embedded_guidance: float = 3.5
    """Guidance value fed to the guidance embedding when guidance_embeds is set."""
    base_image_seq_len: int = 256
    """Token count at which the flow shift mu equals base_shift."""
    max_image_seq_len: int = 4096
    """Token count at which mu equals max_shift (linear in between, extrapolated beyond)."""
    base_shift: float = 0.5
    """mu at base_image_seq_len."""
    max_shift: float = 1.15
    """mu at max_image_seq_len."""
    # ---- where the frozen/pretrained parts come from ----
    pretrained_path: str | None = None
    """Local diffusers-format FLUX.1-dev folder (transformer/, vae/, text_encoder*/, tokenizer*/).
    When set, build_decoder loads its weights; only the semantic projection starts at zero."""
    extra: dict = field(default_factory=dict)
    """Free-form notes carried into decoder_config.json (e.g. which tokenizer fed the features)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown decoder variant {self.variant!r}; use one of {VARIANTS}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if len(self.vae_block_out_channels) != 4:
            raise ValueError("vae_block_out_channels needs 4 levels: FLUX assumes an 8x downsampling VAE")
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        self.vae_block_out_channels = tuple(self.vae_block_out_channels)
        if self.tokenizer_patch < 1 or TOKEN_PIXELS % self.tokenizer_patch:
            raise ValueError(f"tokenizer_patch={self.tokenizer_patch} must divide the {TOKEN_PIXELS} px decoder token")

    @property
    def feature_fold(self) -> int:
        """Code tokens per decoder token side (1 for X-Omni's patch-16 tokenizer)."""
        return TOKEN_PIXELS // self.tokenizer_patch

    @property
    def in_channels(self) -> int:
        """Packed latent width seen by the transformer (2x2 patches of the VAE latent)."""
        return self.latent_channels * LATENT_PATCH * LATENT_PATCH

    @property
    def token_pixels(self) -> int:
        """Pixels per decoder token side (VAE downsampling x latent packing): the image tokenizer's patch
        must equal it, so that one code feeds exactly one decoder token (see check_decoder_patch)."""
        return TOKEN_PIXELS

    @property
    def inner_dim(self) -> int:
        """Transformer width."""
        return self.num_attention_heads * self.attention_head_dim

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> "DecoderConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown decoder config keys {sorted(unknown)}; was it written by a newer version?")
        return cls(**data)


def feature_fold(tokenizer_patch: int) -> int:
    """Code tokens per 16 px decoder token side for a tokenizer patch; ValueError unless the patch divides 16."""
    p = int(tokenizer_patch)
    if p < 1 or TOKEN_PIXELS % p:
        raise ValueError(f"image tokenizer patch {p} px does not divide the decoder's {TOKEN_PIXELS} px token (VAE "
                         f"{VAE_SCALE}x downsampling, {LATENT_PATCH}x{LATENT_PATCH} latent packing): use a patch of "
                         "16, 8, 4, 2 or 1")
    return TOKEN_PIXELS // p


def check_decoder_patch(tokenizer_patch: int, cfg: "DecoderConfig | None" = None) -> int:
    """The fold (code tokens per decoder token side) for an image tokenizer's patch; ValueError (one line)
    when the decoder was trained for another patch, or the patch does not divide the 16 px decoder token."""
    fold = feature_fold(tokenizer_patch)
    if cfg is not None and int(tokenizer_patch) != cfg.tokenizer_patch:
        raise ValueError(f"image tokenizer patch {tokenizer_patch} px != the {cfg.tokenizer_patch} px patch this "
                         "decoder was trained on: use the decoder trained on this image tokenizer's features")
    return fold


def decoder_adapter_dim(tokenizer_adapter_dim: int, tokenizer_patch: int) -> int:
    """Width of a decoder token's features: the tokenizer's adapter_dim x fold^2."""
    return int(tokenizer_adapter_dim) * feature_fold(tokenizer_patch) ** 2


def _tokenizer_adapter_dim(tokenizer_preset: str) -> int:
    # Lazy: the tokenizer package is optional for users who only load an exported decoder.
    from megatron_xomni.models.siglip_vq import tokenizer_config

    return int(tokenizer_config(tokenizer_preset).adapter_dim)


def decoder_config(
    preset: str = "tiny",
    variant: str = "text",
    *,
    adapter_dim: int | None = None,
    pretrained_path: str | None = None,
    **overrides,
) -> DecoderConfig:
    """Preset configs.

    - ``xomni``: FLUX.1-dev dimensions (19 double + 38 single blocks, 24 x 128 heads, T5 4096, CLIP 768,
      16-channel VAE), adapter 1536 (the X-Omni tokenizer). Pass ``pretrained_path`` to load FLUX.1-dev.
    - ``tiny``: a few-block model that trains on a laptop CPU; adapter_dim defaults to the tiny tokenizer's.
    """
    if preset in OLD_PRESETS:
        raise ValueError(f"decoder preset `{preset}` is now `{OLD_PRESETS[preset]}`: use decoder_config({OLD_PRESETS[preset]!r}, ...)")
    if preset not in PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; use one of {PRESETS}")
    if preset == "xomni":
        cfg = dict(adapter_dim=adapter_dim if adapter_dim is not None else 1536, text_encoder="flux")
    else:
        cfg = dict(
            adapter_dim=adapter_dim if adapter_dim is not None else _tokenizer_adapter_dim("tiny"),
            num_layers=2,
            num_single_layers=2,
            num_attention_heads=4,
            attention_head_dim=16,
            axes_dims_rope=(4, 6, 6),
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=False,
            vae_block_out_channels=(8, 16, 32, 32),
            vae_layers_per_block=1,
            vae_norm_num_groups=4,
            vae_mid_attention=False,
            # A freshly fitted tiny VAE is not calibrated like FLUX's; identity scaling keeps it honest.
            scaling_factor=1.0,
            shift_factor=0.0,
            text_encoder="tiny",
            max_text_tokens=32,
            clip_max_tokens=16,
            num_inference_steps=8,
        )
    cfg.update(overrides)
    return DecoderConfig(variant=variant, pretrained_path=pretrained_path, **cfg)
