"""The semantic FLUX decoder: FLUX transformer + zero-initialised projection of tokenizer features.

X-Omni section 3: the tokenizer's adapter output per token goes through a zero-initialised
Linear(adapter_dim -> inner_dim, no bias) and is added to the image hidden states after the
double-stream blocks, before the single-stream blocks. Grids align 1:1 (one token = 16x16 px).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from megatron_xomni.file_checks import BadFile, check_pretrained_folder, read_json, require_dir
from megatron_xomni.models.flux_decoder.config import LATENT_PATCH, TOKEN_PIXELS, VAE_SCALE, DecoderConfig
from megatron_xomni.models.flux_decoder.prompt import CLIP_DIR, T5_DIR, PromptEncoder

TRANSFORMER_DIR, VAE_DIR, CONFIG_FILE = "transformer", "vae", "decoder_config.json"
# Parameter names that do not exist in FLUX.1-dev; everything else loads from it.
NEW_PARAMS = ("semantic_proj.weight", "pooled_embedding")


class SemanticFluxTransformer(FluxTransformer2DModel):
    """``FluxTransformer2DModel`` plus ``semantic_proj`` (zero-init) and, for the image variant, a
    learned pooled embedding.

    The semantic residual is injected through the parent's own per-double-block residual hook
    (``controlnet_block_samples``): zeros for every block but the last, the projected features
    for the last one. So the parent's forward runs unmodified, gradient checkpointing keeps
    working, and with ``semantic_proj`` at zero the output equals plain FLUX bit for bit
    (x + 0 == x exactly in IEEE arithmetic).
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        adapter_dim: int = 1536,
        decoder_variant: str = "text",
    ):
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope,
        )
        if decoder_variant not in ("text", "image"):
            raise ValueError(f"decoder_variant must be 'text' or 'image', got {decoder_variant!r}")
        self.semantic_proj = nn.Linear(adapter_dim, self.inner_dim, bias=False)
        # Image variant: FLUX's pooled CLIP vector is replaced by one learned vector (zero-init).
        self.pooled_embedding = (
            nn.Parameter(torch.zeros(pooled_projection_dim)) if decoder_variant == "image" else None
        )
        self.reset_new_parameters()

    def reset_new_parameters(self) -> None:
        """Zero the parameters FLUX does not have, so the untrained decoder is exactly FLUX."""
        with torch.no_grad():
            nn.init.zeros_(self.semantic_proj.weight)
            if self.pooled_embedding is not None:
                self.pooled_embedding.zero_()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs=None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
        semantic_features: torch.Tensor | None = None,
    ):
        """Parent forward plus ``semantic_features`` [B, image_tokens, adapter_dim] (raster order).

        Image variant: leave ``encoder_hidden_states``/``pooled_projections``/``txt_ids`` as None;
        the text stream gets zero tokens and the pooled input is the learned embedding.
        """
        batch, seq = hidden_states.shape[:2]
        if self.config.decoder_variant == "image":
            if encoder_hidden_states is not None and encoder_hidden_states.shape[1] > 0:
                raise ValueError("the image decoder variant has no text stream; pass no encoder_hidden_states")
            encoder_hidden_states = hidden_states.new_zeros(batch, 0, self.config.joint_attention_dim)
            txt_ids = hidden_states.new_zeros(0, 3)
            pooled_projections = self.pooled_embedding.to(hidden_states.dtype).expand(batch, -1)
        if semantic_features is not None:
            if semantic_features.ndim != 3 or semantic_features.shape[0] != batch or semantic_features.shape[1] != seq:
                raise ValueError(
                    f"semantic_features must be [B={batch}, tokens={seq}, adapter_dim], got {tuple(semantic_features.shape)}"
                )
            if semantic_features.shape[2] != self.config.adapter_dim:
                raise ValueError(
                    f"semantic_features have dim {semantic_features.shape[2]} but the decoder expects "
                    f"adapter_dim={self.config.adapter_dim}; use features from the matching tokenizer"
                )
            residual = self.semantic_proj(semantic_features.to(hidden_states.dtype))
            controlnet_block_samples = self._merge_block_residuals(
                residual, controlnet_block_samples, controlnet_blocks_repeat
            )
            controlnet_blocks_repeat = False
        return super().forward(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
            guidance=guidance, joint_attention_kwargs=joint_attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            controlnet_single_block_samples=controlnet_single_block_samples, return_dict=return_dict,
            controlnet_blocks_repeat=controlnet_blocks_repeat,
        )

    def _merge_block_residuals(self, residual, user_samples, repeat):
        """One residual per double block (the parent then adds entry i after block i)."""
        n = len(self.transformer_blocks)
        if user_samples is None:
            per_block = [0] * (n - 1) + [residual]
        else:  # keep a user's ControlNet working: expand its schedule the way the parent would
            k = len(user_samples)
            interval = int(math.ceil(n / k))
            per_block = [user_samples[i % k] if repeat else user_samples[i // interval] for i in range(n)]
            per_block[-1] = per_block[-1] + residual
        return per_block


def transformer_kwargs(cfg: DecoderConfig) -> dict:
    """SemanticFluxTransformer arguments implied by a DecoderConfig."""
    return dict(
        in_channels=cfg.in_channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=cfg.guidance_embeds, axes_dims_rope=tuple(cfg.axes_dims_rope), adapter_dim=cfg.adapter_dim,
        decoder_variant=cfg.variant,
    )


def transformer_from_config(cfg: DecoderConfig) -> SemanticFluxTransformer:
    return SemanticFluxTransformer(**transformer_kwargs(cfg))


def vae_from_config(cfg: DecoderConfig) -> AutoencoderKL:
    levels = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups, scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=cfg.vae_mid_attention,
    )


def load_semantic_transformer(cfg: DecoderConfig, flux_path: str | Path, torch_dtype=None) -> SemanticFluxTransformer:
    """FLUX.1-dev (diffusers layout) weights + zero semantic projection; only NEW_PARAMS may be missing."""
    # low_cpu_mem_usage=False: with accelerate present diffusers would leave missing keys on the meta device.
    model, info = SemanticFluxTransformer.from_pretrained(
        Path(flux_path) / TRANSFORMER_DIR, torch_dtype=torch_dtype, low_cpu_mem_usage=False, output_loading_info=True,
        adapter_dim=cfg.adapter_dim, decoder_variant=cfg.variant,
    )
    bad = set(info["missing_keys"]) - set(NEW_PARAMS)
    if bad or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{flux_path} does not match the configured FLUX dimensions (missing {sorted(bad)[:4]}, unexpected "
            f"{sorted(info['unexpected_keys'])[:4]}, mismatched {info['mismatched_keys'][:2]}); use the 'xomni' preset"
        )
    model.reset_new_parameters()  # the fresh projection must start at exactly zero
    want = transformer_kwargs(cfg)
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in ((k, model.config[k]) for k in want)}
    if got != want:
        raise ValueError(f"{flux_path}: transformer config {got} does not match the decoder config {want}")
    return model


class XOmniDecoder(nn.Module):
    """Transformer + VAE (+ prompt encoder for the text variant), with the latent plumbing FLUX uses."""

    def __init__(self, cfg: DecoderConfig, transformer: SemanticFluxTransformer, vae: AutoencoderKL,
                 prompt_encoder: PromptEncoder | None):
        super().__init__()
        if transformer.config.decoder_variant != cfg.variant:
            raise ValueError(
                f"transformer is a {transformer.config.decoder_variant!r} decoder but the config says {cfg.variant!r}"
            )
        if (cfg.variant == "text") != (prompt_encoder is not None):
            raise ValueError("the text variant needs a prompt encoder and the image variant must not have one")
        self.cfg, self.transformer, self.vae, self.prompt_encoder = cfg, transformer, vae, prompt_encoder
        # The VAE is always frozen: the decoder learns in FLUX's latent space.
        self.vae.requires_grad_(False).eval()

    # ---------------------------------------------------------------- latent plumbing
    @staticmethod
    def check_grid(grid_hw: tuple[int, int], tokens: int | None = None) -> tuple[int, int]:
        h, w = (int(v) for v in grid_hw)
        if h <= 0 or w <= 0:
            raise ValueError(f"grid {grid_hw} must be positive (tokens per column, tokens per row)")
        if tokens is not None and h * w != tokens:
            raise ValueError(f"grid {h}x{w} = {h * w} tokens does not match the {tokens} feature tokens given")
        return h, w

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] -> packed, scaled latents [B, (H/16)(W/16), in_channels].

        Uses the posterior mean (not a sample) so the training target is deterministic given the image.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % TOKEN_PIXELS or pixels.shape[3] % TOKEN_PIXELS:
            raise ValueError(f"pixels must be [B,3,H,W] with H, W multiples of {TOKEN_PIXELS}, got {tuple(pixels.shape)}")
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(pixels.to(vae_dtype)).latent_dist.mode()
        z = (z - self.cfg.shift_factor) * self.cfg.scaling_factor
        return self.pack(z)

    @torch.no_grad()
    def decode_latents(self, packed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Inverse of encode_pixels: -> pixels [B,3,16h,16w] clamped to [-1,1]."""
        z = self.unpack(packed, grid_hw)
        z = z / self.cfg.scaling_factor + self.cfg.shift_factor
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(vae_dtype)).sample.float().clamp(-1, 1)

    @staticmethod
    def pack(z: torch.Tensor) -> torch.Tensor:
        """[B,C,2h,2w] -> [B, h*w, 4C], token (i, j) = 2x2 latent patch, raster order (as FluxPipeline)."""
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        b, c, hh, ww = z.shape
        return FluxPipeline._pack_latents(z, b, c, hh, ww)

    @staticmethod
    def unpack(packed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        h, w = XOmniDecoder.check_grid(grid_hw, packed.shape[1])
        return FluxPipeline._unpack_latents(packed, h * TOKEN_PIXELS, w * TOKEN_PIXELS, VAE_SCALE)

    @staticmethod
    def image_ids(grid_hw: tuple[int, int], device, dtype) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        h, w = grid_hw
        return FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype)

    # ---------------------------------------------------------------- conditioning
    def prompt_inputs(self, prompts: list[str] | None, batch: int, device, dtype):
        """-> kwargs for the transformer's text stream (empty for the image variant)."""
        if self.cfg.variant == "image":
            if prompts is not None and any(prompts):
                raise ValueError("the image decoder variant takes no prompts; pass prompts=None")
            return {}
        prompts = [""] * batch if prompts is None else list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}")
        embeds, pooled = self.prompt_encoder.encode(prompts, device=device)
        return dict(
            encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
        )

    def velocity(self, latents, sigma, features, grid_hw, text_inputs: dict, guidance: float | None = None):
        """Flow velocity v(x_t, t) predicted by the transformer (t = sigma in [0, 1])."""
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=latents.dtype).expand(b)
        g = None
        if self.cfg.guidance_embeds:
            g = torch.full((b,), self.cfg.embedded_guidance if guidance is None else guidance,
                           device=latents.device, dtype=latents.dtype)
        return self.transformer(
            hidden_states=latents, timestep=sigma, guidance=g, img_ids=self.image_ids(grid_hw, latents.device, latents.dtype),
            semantic_features=features, return_dict=False, **text_inputs,
        )[0]

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | Path, save_frozen: bool | None = None) -> None:
        """diffusers layout: transformer/ (save_pretrained), vae/, text encoders, decoder_config.json.

        Frozen parts loaded from ``cfg.pretrained_path`` (FLUX.1-dev VAE and text encoders) are
        referenced, not copied, unless ``save_frozen`` is True.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_frozen = self.cfg.pretrained_path is None if save_frozen is None else save_frozen
        self.transformer.save_pretrained(path / TRANSFORMER_DIR)
        cfg = self.cfg
        if save_frozen:
            self.vae.save_pretrained(path / VAE_DIR)
            if self.prompt_encoder is not None:
                self.prompt_encoder.save_pretrained(path)
            cfg = DecoderConfig(**{**cfg.__dict__, "pretrained_path": None})
        cfg.to_json(path / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None, torch_dtype=None) -> "XOmniDecoder":
        """Load an export; ``variant`` (if given) must match the saved one."""
        path = Path(path)
        cfg = check_export(path)
        if variant is not None and variant != cfg.variant:
            raise ValueError(f"{path} holds a {cfg.variant!r} decoder but a {variant!r} decoder was requested")
        transformer = SemanticFluxTransformer.from_pretrained(path / TRANSFORMER_DIR, torch_dtype=torch_dtype)
        if transformer.config.decoder_variant != cfg.variant:
            raise ValueError(f"{path}: transformer variant {transformer.config.decoder_variant!r} != config {cfg.variant!r}")
        frozen = Path(cfg.pretrained_path) if cfg.pretrained_path else path
        vae = AutoencoderKL.from_pretrained(frozen / VAE_DIR, torch_dtype=torch_dtype)
        prompt = PromptEncoder.from_pretrained(cfg, frozen, torch_dtype) if cfg.variant == "text" else None
        return cls(cfg, transformer, vae, prompt)


def check_export(path: str | Path) -> DecoderConfig:
    """The DecoderConfig of an export after checking its files (configs and safetensors headers of the
    transformer, the VAE and, for the text variant, both text encoders); BadFile names the first bad one."""
    fix = "re-export the decoder with XOmniDecoder.save_pretrained"
    path = require_dir(path, "decoder folder", fix)
    read_json(path / CONFIG_FILE, "decoder config", f"{fix} (a FLUX checkpoint loads with build_decoder)",
              required=("variant", "adapter_dim"))
    try:
        cfg = DecoderConfig.from_json(path / CONFIG_FILE)
    except (TypeError, ValueError) as e:
        raise BadFile(f"decoder config {path / CONFIG_FILE}: {e}") from None
    check_pretrained_folder(path / TRANSFORMER_DIR, "diffusion_pytorch_model.safetensors", "decoder transformer", fix)
    frozen = Path(cfg.pretrained_path) if cfg.pretrained_path else path
    frozen_fix = fix + " (save_frozen=True), or restore its pretrained_path"
    check_pretrained_folder(frozen / VAE_DIR, "diffusion_pytorch_model.safetensors", "decoder VAE", frozen_fix)
    if cfg.variant == "text":
        for sub in (CLIP_DIR, T5_DIR):
            check_pretrained_folder(frozen / sub, "model.safetensors", "decoder text encoder", frozen_fix)
    return cfg


def build_decoder(cfg: DecoderConfig, seed: int = 0, torch_dtype=None) -> XOmniDecoder:
    """A fresh decoder: FLUX.1-dev weights when ``cfg.pretrained_path`` is set, else random (seeded)."""
    if cfg.pretrained_path:
        root = Path(cfg.pretrained_path)
        transformer = load_semantic_transformer(cfg, root, torch_dtype)
        vae = AutoencoderKL.from_pretrained(root / VAE_DIR, torch_dtype=torch_dtype)
        prompt = PromptEncoder.from_pretrained(cfg, root, torch_dtype) if cfg.variant == "text" else None
        return XOmniDecoder(cfg, transformer, vae, prompt)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = transformer_from_config(cfg)
        vae = vae_from_config(cfg)
    if cfg.text_encoder == "flux" and cfg.variant == "text":
        raise ValueError("random 'flux' text encoders are not built (5B params); set pretrained_path or text_encoder='tiny'")
    prompt = PromptEncoder.tiny(cfg, seed=seed) if cfg.variant == "text" else None
    dec = XOmniDecoder(cfg, transformer, vae, prompt)
    return dec.to(torch_dtype) if torch_dtype is not None else dec
