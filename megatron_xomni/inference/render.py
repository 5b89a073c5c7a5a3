"""Rendering image codes to pictures: the frozen SigLIP-VQ tokenizer + diffusion decoder."""

from __future__ import annotations

import torch


class Renderer:
    """Frozen image tokenizer + diffusion decoder: codes [B, h, w] -> PIL images."""

    def __init__(self, image_tokenizer: str, decoder: str, steps: int):
        from megatron_xomni.models.flux_decoder import XOmniDecoder
        from megatron_xomni.inference.tokenize_corpus import load_image_tokenizer

        self.tokenizer = load_image_tokenizer(image_tokenizer)
        self.decoder = XOmniDecoder.from_pretrained(decoder).eval().requires_grad_(False)
        self.steps = steps

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor, seeds: list[int], prompts: list[str]) -> list:
        from PIL import Image

        from megatron_xomni.models.flux_decoder.sampling import sample_from_codes

        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs = {"prompts": prompts} if getattr(self.decoder.cfg, "variant", "image") == "text" else {}
        pixels = sample_from_codes(self.decoder, self.tokenizer, codes, num_inference_steps=self.steps,
                                   generator=gens, **kwargs)
        arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
