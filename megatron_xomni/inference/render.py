"""Codes -> images: the frozen SigLIP-VQ tokenizer's adapter features through the diffusion decoder.

The one codes -> image path of the package: XOmniPipeline, the evaluation runner and the GRPO
trainer all render through `Renderer`. Image k of a call is fully determined by (codes[k], seeds[k],
prompts[k], steps, guidance): its decoder noise comes from a CPU generator seeded with seeds[k]
(device-independent), whatever batch it is rendered in.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megatron_xomni.data.corpus_source import pil_to_pixels  # noqa: F401  (the inverse of to_pil; re-exported)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB image (the rounding diffusers' image processor uses)."""
    x = ((pixels.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    arr = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


class Renderer:
    """Frozen image tokenizer + diffusion decoder: codes [B, h, w] -> PIL images.

    `image_tokenizer` / `decoder`: loaded modules, or folders (a SiglipVQTokenizer save_pretrained
    folder or preset name; a decoder export), loaded onto `device` (default CPU) in `torch_dtype`.
    `steps`: Euler steps (None: the decoder config's default). `guidance`: decoder-side CFG scale
    (1 = off). `batch_size`: images per decoder call (bounds memory; does not change any image).
    """

    def __init__(self, image_tokenizer, decoder, steps: Optional[int] = None, guidance: float = 1.0,
                 batch_size: int = 64, device: str | torch.device = "cpu", torch_dtype=None):
        if isinstance(image_tokenizer, (str, os.PathLike)):
            from megatron_xomni.inference.tokenize_corpus import load_image_tokenizer

            image_tokenizer = load_image_tokenizer(str(image_tokenizer), device=str(device))
        if isinstance(decoder, (str, os.PathLike)):
            from megatron_xomni.models.flux_decoder import XOmniDecoder

            decoder = XOmniDecoder.from_pretrained(decoder, torch_dtype=torch_dtype).to(device)
        self.tokenizer = image_tokenizer.eval().requires_grad_(False)
        self.decoder = decoder.eval().requires_grad_(False)
        self.steps = steps
        self.guidance = float(guidance)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)

    @property
    def patch(self) -> int:
        """Pixels per code (the image tokenizer's patch size)."""
        cfg = self.tokenizer.config if hasattr(self.tokenizer, "config") else self.tokenizer.cfg
        return int(cfg.patch_size)

    @property
    def needs_prompts(self) -> bool:
        """The "text" decoder variant conditions on the prompt as well as on the codes."""
        return getattr(self.decoder.cfg, "variant", "image") == "text"

    @torch.no_grad()
    def __call__(self, codes, seeds: Sequence[int], prompts: Optional[Sequence[str]] = None,
                 steps: Optional[int] = None, guidance: Optional[float] = None) -> list[Image.Image]:
        """Codes ([B, h, w] tensor or B [h, w] arrays of one grid) -> B images; one seed (and prompt) per image."""
        from megatron_xomni.models.flux_decoder.sampling import sample_from_codes

        codes = [torch.as_tensor(c) for c in codes]
        if prompts is None:
            if self.needs_prompts:
                raise ValueError("this decoder is the 'text' variant: pass one prompt per image")
            prompts = [""] * len(codes)
        if not (len(codes) == len(seeds) == len(prompts)):
            raise ValueError(f"{len(codes)} code grids, {len(seeds)} seeds and {len(prompts)} prompts: "
                             "pass one of each per image")
        device = next(self.decoder.transformer.parameters()).device
        images: list[Image.Image] = []
        for s in range(0, len(codes), self.batch_size):
            batch = torch.stack(codes[s:s + self.batch_size]).to(device=device, dtype=torch.long)
            pixels = sample_from_codes(
                self.decoder, self.tokenizer, batch,
                prompts=list(prompts[s:s + self.batch_size]) if self.needs_prompts else None,
                num_inference_steps=steps if steps is not None else self.steps,
                guidance_scale=self.guidance if guidance is None else float(guidance),
                generator=[int(x) for x in seeds[s:s + self.batch_size]],
            )
            images.extend(to_pil(p) for p in pixels)
        return images
