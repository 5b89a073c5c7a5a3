"""``vlm_judge``: a Qwen2.5-VL yes/no judge of text-image alignment, loaded from a local directory.

The judge sees the image and the question ``"Does this image show: {prompt}? Answer yes or no."``
in the checkpoint's chat template (with the generation prompt appended) and we read the
next-token distribution after it:

    score = P(yes) / (P(yes) + P(no))

where P(yes) sums the softmax probability of every answer spelling in ``yes_tokens`` that is a
single token of the vocabulary (default "yes" and "Yes"; likewise for no). Summing spellings
makes the score insensitive to the model's capitalisation habit. Range [0, 1]; applies to every image.

Inputs are built from the checkpoint's tokenizer, image processor and chat template; the image
placeholder token is expanded to one token per merged patch (grid_t * grid_h * grid_w /
merge_size^2), which is what Qwen2.5-VL's processor does. We do not instantiate
``Qwen2_5_VLProcessor`` itself because in transformers 5 its constructor insists on a video
processor class that only exists when torchvision is installed, and this reward needs no video.
Batches are left-padded so the last position of every row is the answer position.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from megatron_xomni.rewards._local import check_batch_size, local_model_dir, torch_dtype
from megatron_xomni.rewards.registry import register_reward

DEFAULT_QUESTION = "Does this image show: {prompt}? Answer yes or no."


def _chat_template(tokenizer, path: Path) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if file.is_file():
            text = file.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise ValueError(f"vlm_judge: {path} has no chat template (tokenizer_config, chat_template.jinja/.json)")


@register_reward("vlm_judge")
class VLMJudgeReward:
    """``model_dir``: local Qwen2.5-VL checkpoint (model, tokenizer, image processor, chat template);
    ``question``: template with ``{prompt}``; ``yes_tokens`` / ``no_tokens``: answer spellings;
    ``max_pixels``: cap on image pixels fed to the vision tower (None: the checkpoint's setting)."""

    required_fields = ()  # reads the prompt only

    def __init__(
        self,
        model_dir: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int = 4,
        question: str = DEFAULT_QUESTION,
        yes_tokens: Sequence[str] = ("yes", "Yes"),
        no_tokens: Sequence[str] = ("no", "No"),
        max_pixels: int | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = local_model_dir(model_dir, "vlm_judge")
        if "{prompt}" not in question:
            raise ValueError(f"vlm_judge question must contain '{{prompt}}', got {question!r}")
        self.question = question
        self.batch_size = check_batch_size(batch_size)
        self.device = torch.device(device)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype(dtype)
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        extra = {"max_pixels": max_pixels} if max_pixels else {}
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, **extra)
        self.chat_template = _chat_template(self.tokenizer, Path(path))
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))
        self.yes_ids = self._single_token_ids(yes_tokens, "yes_tokens")
        self.no_ids = self._single_token_ids(no_tokens, "no_tokens")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("vlm_judge: yes_tokens and no_tokens share a token id")

    def _single_token_ids(self, words: Sequence[str], arg: str) -> list[int]:
        ids = []
        for word in words:
            enc = self.tokenizer.encode(word, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise ValueError(f"vlm_judge: none of {arg}={list(words)} is a single token of this tokenizer")
        return ids

    def _texts(self, prompts: Sequence[str], grid_thw: torch.Tensor) -> list[str]:
        texts = []
        for prompt, grid in zip(prompts, grid_thw):
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self.question.format(prompt=prompt)}]}]
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            if text.count(self.image_token) != 1:
                raise ValueError(
                    f"vlm_judge: the chat template produced {text.count(self.image_token)} {self.image_token} "
                    "placeholders for one image; use a Qwen2.5-VL chat template"
                )
            n_tokens = int(grid.prod()) // (self.merge_size**2)
            texts.append(text.replace(self.image_token, self.image_token * n_tokens))
        return texts

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[Image.Image], metas: list[dict]) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch = [im.convert("RGB") for im in images[start:stop]]
            vision = self.image_processor(images=batch, return_tensors="pt")
            texts = self._texts(prompts[start:stop], vision["image_grid_thw"])
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
            logits = self.model(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
                pixel_values=vision["pixel_values"].to(self.device, self.model.dtype),
                image_grid_thw=vision["image_grid_thw"].to(self.device),
                logits_to_keep=1,  # only the answer position's distribution is needed
            ).logits[:, -1].float()
            # P(yes)/(P(yes)+P(no)) = exp(lse(yes logits) - lse(yes and no logits)); the softmax
            # normaliser over the full vocabulary cancels.
            log_yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
            log_both = torch.logsumexp(logits[:, self.yes_ids + self.no_ids], dim=-1)
            scores += torch.exp(log_yes - log_both).cpu().tolist()
        return scores
