"""Sampling: FLUX's flow-matching Euler sampler with decoder-side classifier-free guidance.

The negative CFG branch is the same decoder with zeroed semantic features (and the empty prompt in
the text variant), as X-Omni describes. Noise is drawn per sample from its own generator, so a
sample depends only on its seed, never on the batch it was drawn in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from megatron_xomni.data.image_grid import ImageGrid, fold_tokens
from megatron_xomni.models.flux_decoder.config import DecoderConfig, check_decoder_patch
from megatron_xomni.models.flux_decoder.model import XOmniDecoder


def make_scheduler(cfg: DecoderConfig) -> FlowMatchEulerDiscreteScheduler:
    """The FLUX.1-dev scheduler configuration (dynamic, resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=cfg.base_shift,
        max_shift=cfg.max_shift, base_image_seq_len=cfg.base_image_seq_len, max_image_seq_len=cfg.max_image_seq_len,
    )


def flux_mu(cfg: DecoderConfig, image_seq_len: int) -> float:
    """mu of FLUX's exponential time shift for a given token count (as FluxPipeline computes it)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)


def sampling_sigmas(cfg: DecoderConfig, num_steps: int, image_seq_len: int, device=None) -> torch.Tensor:
    """The shifted sigma schedule (num_steps + 1 values, ending at 0) the Euler sampler walks."""
    sched = make_scheduler(cfg)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=flux_mu(cfg, image_seq_len), device=device)
    return sched.sigmas


def _generators(generator, batch: int) -> list[torch.Generator]:
    """int seed -> seeds seed..seed+B-1; list of ints or Generators -> one per sample."""
    if generator is None:
        generator = 0
    if isinstance(generator, int):
        generator = [generator + i for i in range(batch)]
    if isinstance(generator, torch.Generator):
        raise ValueError("pass one generator (or int seed) per sample, not a single torch.Generator")
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} seeds/generators for a batch of {batch}; pass one per sample")
    return [g if isinstance(g, torch.Generator) else torch.Generator("cpu").manual_seed(int(g)) for g in generator]


def initial_noise(decoder: XOmniDecoder, grid_hw, generator, batch: int, device, dtype) -> torch.Tensor:
    """Packed Gaussian latents [B, h*w, in_channels]; per-sample CPU generators (device-independent)."""
    h, w = decoder.check_grid(grid_hw)
    shape = (batch, decoder.cfg.latent_channels, 2 * h, 2 * w)
    # Drawn in the unpacked layout (as FluxPipeline does) so seeds reproduce FLUX's noise for a size.
    z = randn_tensor(shape, generator=_generators(generator, batch), device=torch.device(device), dtype=dtype)
    return decoder.pack(z)


def guided_velocity(
    decoder: XOmniDecoder, latents, sigma, features, grid_hw, text_cond: dict, text_uncond: dict | None,
    guidance_scale: float, embedded_guidance: float | None = None,
) -> torch.Tensor:
    """v = v_uncond + s * (v_cond - v_uncond); at s == 1 only the conditional branch runs."""
    if guidance_scale == 1.0:
        return decoder.velocity(latents, sigma, features, grid_hw, text_cond, embedded_guidance)
    # Both branches in one batched call; the negative branch has zero semantic features.
    both = {k: torch.cat([text_cond[k], text_uncond[k]]) if k != "txt_ids" else text_cond[k] for k in text_cond}
    v = decoder.velocity(
        torch.cat([latents, latents]), sigma, torch.cat([features, torch.zeros_like(features)]), grid_hw, both,
        embedded_guidance,
    )
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def check_features(decoder: XOmniDecoder, features: torch.Tensor, grid_hw) -> tuple[int, int]:
    if not torch.is_tensor(features) or features.ndim != 3:
        raise ValueError(f"features must be a [B, h*w, adapter_dim] tensor, got {getattr(features, 'shape', type(features))}")
    if features.shape[2] != decoder.cfg.adapter_dim:
        raise ValueError(
            f"features have dim {features.shape[2]} but the decoder expects adapter_dim={decoder.cfg.adapter_dim}; "
            "use the tokenizer this decoder was trained with"
        )
    return decoder.check_grid(grid_hw, features.shape[1])


@torch.no_grad()
def sample(
    decoder: XOmniDecoder,
    features: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    prompts: Sequence[str] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float = 1.0,
    embedded_guidance: float | None = None,
    generator=None,
    return_latents: bool = False,
) -> torch.Tensor:
    """Decode semantic features [B, h*w, adapter_dim] to pixels [B, 3, 16h, 16w] in [-1, 1].

    ``generator``: int seed (sample i uses seed + i), or one int/Generator per sample.
    ``guidance_scale``: decoder-side CFG against zeroed features (+ empty prompt); 1 disables it.
    """
    cfg = decoder.cfg
    h, w = check_features(decoder, features, grid_hw)
    steps = num_inference_steps or cfg.num_inference_steps
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    param = next(decoder.transformer.parameters())
    device, dtype = param.device, param.dtype
    b = features.shape[0]
    features = features.to(device=device, dtype=dtype)
    latents = initial_noise(decoder, (h, w), generator, b, device, dtype)
    text_cond = decoder.prompt_inputs(None if prompts is None else list(prompts), b, device, dtype)
    text_uncond = decoder.prompt_inputs(None, b, device, dtype) if guidance_scale != 1.0 else None

    sched = make_scheduler(cfg)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=flux_mu(cfg, h * w), device=device)
    for t in sched.timesteps:
        v = guided_velocity(decoder, latents, t / sched.config.num_train_timesteps, features, (h, w), text_cond,
                            text_uncond, guidance_scale, embedded_guidance)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    if return_latents:
        return latents
    return decoder.decode_latents(latents, (h, w))


def features_for_decoder(tokenizer, codes: torch.Tensor, cfg: DecoderConfig | None = None):
    """Token codes [B, h, w] -> (features [B, tokens, fold^2 * adapter_dim], decoder grid (h/fold, w/fold)):
    the tokenizer's adapter features, folded onto the decoder's 16 px grid (fold 1 for a patch-16 tokenizer).
    `cfg` checks that the decoder was trained for this tokenizer's patch."""
    tcfg = tokenizer.config if hasattr(tokenizer, "config") else tokenizer.cfg
    fold = check_decoder_patch(int(tcfg.patch_size), cfg)
    grid = ImageGrid.from_tokens(codes.shape[1], codes.shape[2], int(tcfg.patch_size))
    feats = fold_tokens(tokenizer.decode_features(codes), grid, fold)
    return feats, grid.fold(fold).shape


@torch.no_grad()
def sample_from_codes(decoder: XOmniDecoder, tokenizer, codes: torch.Tensor, **kwargs) -> torch.Tensor:
    """Token codes [B, h, w] (from the AR model or tokenizer.encode) -> pixels [B, 3, h*p, w*p] (p: the
    tokenizer's patch; the decoder renders them on its 16 px grid, see features_for_decoder)."""
    if not torch.is_tensor(codes) or codes.ndim != 3 or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be an integer [B, h, w] tensor, got {getattr(codes, 'shape', type(codes))}")
    tcfg = tokenizer.config if hasattr(tokenizer, "config") else tokenizer.cfg
    fold = check_decoder_patch(int(tcfg.patch_size), decoder.cfg)
    if int(tcfg.adapter_dim) * fold * fold != decoder.cfg.adapter_dim:
        raise ValueError(f"tokenizer adapter_dim {tcfg.adapter_dim} (x {fold * fold} folded) != decoder adapter_dim "
                         f"{decoder.cfg.adapter_dim}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= int(tcfg.codebook_size)):
        raise ValueError(f"codes must lie in [0, {tcfg.codebook_size}); got range [{int(codes.min())}, {int(codes.max())}]")
    features, grid = features_for_decoder(tokenizer, codes, decoder.cfg)
    return sample(decoder, features, grid, **kwargs)
