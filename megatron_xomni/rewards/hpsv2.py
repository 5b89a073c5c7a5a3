"""``hpsv2``: a CLIP-style human-preference scorer (HPSv2) loaded from a local directory.

HPSv2 is an OpenCLIP ViT-H/14 fine-tuned on human preference pairs; its score is the cosine
similarity between the L2-normalised image and prompt embeddings (no logit scale), typically
~0.2-0.35. This adapter runs any checkpoint in transformers' ``CLIPModel`` layout (HPSv2 weights
converted from OpenCLIP, or a stock CLIP as a stand-in) with its ``CLIPProcessor``: resize,
centre-crop and normalise the image, tokenise the prompt (truncated to the text model's
context). Score range: [-1, 1]. Applies to every image.
"""
from __future__ import annotations

import torch
from PIL import Image

from megatron_xomni.rewards._local import check_batch_size, local_model_dir, torch_dtype
from megatron_xomni.rewards.registry import register_reward


@register_reward("hpsv2")
class HPSv2Reward:
    """``model_dir``: local CLIPModel + CLIPProcessor folder; ``device``/``dtype``: where and how to run;
    ``batch_size``: images per forward pass."""

    required_fields = ()  # reads the prompt only

    def __init__(
        self, model_dir: str | None = None, device: str = "cpu", dtype: str | None = None, batch_size: int = 16
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = local_model_dir(model_dir, "hpsv2")
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype(dtype))
        self.model = model.to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.max_text_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[Image.Image], metas: list[dict]) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            inputs = self.processor(
                text=list(prompts[start:stop]),
                images=[im.convert("RGB") for im in images[start:stop]],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_text_len,
            ).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model(**inputs)
            # CLIPModel returns L2-normalised projected embeddings, so the row-wise dot is the cosine.
            cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
            scores += cosine.cpu().tolist()
        return scores
