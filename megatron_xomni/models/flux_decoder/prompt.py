"""Frozen prompt encoders of the "text" decoder variant (FLUX's CLIP-L pooled + T5 sequence)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from megatron_xomni.models.flux_decoder.config import DecoderConfig

# Subfolder names follow the diffusers FLUX.1-dev layout so one loader serves FLUX and our exports.
CLIP_DIR, CLIP_TOK_DIR, T5_DIR, T5_TOK_DIR = "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"


class PromptEncoder(nn.Module):
    """CLIP text model -> pooled embedding [B, pooled_dim]; T5 encoder -> sequence [B, L, joint_dim].

    Always frozen (FLUX and X-Omni never train them). ``encode(prompts)`` mirrors what FluxPipeline
    feeds the transformer: T5 hidden states padded to ``max_text_tokens`` and CLIP's pooler output.
    """

    def __init__(self, cfg: DecoderConfig, clip, clip_tokenizer, t5, t5_tokenizer):
        super().__init__()
        self.cfg = cfg
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def tiny(cls, cfg: DecoderConfig, seed: int = 0) -> "PromptEncoder":
        """Random tiny CLIP + T5 over ByT5's byte vocabulary (built offline, no files)."""
        from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        tok = ByT5Tokenizer()
        vocab = len(tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=vocab, d_model=cfg.joint_attention_dim, d_kv=8, d_ff=2 * cfg.joint_attention_dim,
                    num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            )
            # CLIP pools at the first eos token; ByT5's eos id is 1, so point the config at it.
            clip = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=vocab, hidden_size=cfg.pooled_projection_dim, intermediate_size=2 * cfg.pooled_projection_dim,
                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=cfg.clip_max_tokens,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                )
            )
        return cls(cfg, clip, tok, t5, tok)

    @classmethod
    def from_pretrained(cls, cfg: DecoderConfig, path: str | Path, torch_dtype=None) -> "PromptEncoder":
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = Path(path)
        clip = CLIPTextModel.from_pretrained(path / CLIP_DIR, torch_dtype=torch_dtype)
        t5 = T5EncoderModel.from_pretrained(path / T5_DIR, torch_dtype=torch_dtype)
        return cls(cfg, clip, AutoTokenizer.from_pretrained(path / CLIP_TOK_DIR), t5, AutoTokenizer.from_pretrained(path / T5_TOK_DIR))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.clip.save_pretrained(path / CLIP_DIR)
        self.t5.save_pretrained(path / T5_DIR)
        self.clip_tokenizer.save_pretrained(path / CLIP_TOK_DIR)
        self.t5_tokenizer.save_pretrained(path / T5_TOK_DIR)

    @torch.no_grad()
    def encode(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, max_text_tokens, joint_dim], pooled [B, pooled_dim])."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (use '' for no prompt)")
        device = device or next(self.t5.parameters()).device
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=self.cfg.clip_max_tokens, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.cfg.max_text_tokens, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        embeds = self.t5(t5_ids, output_hidden_states=False)[0]
        return embeds, pooled
