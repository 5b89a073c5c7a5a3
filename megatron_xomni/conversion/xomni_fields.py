"""The config.json fields the released `XOmniForCausalLM` reads beyond Qwen2's, written from a run's own
text tokenizer, image tokenizer and decoder folders.

What the released inference code reads (`init_vision` and the forward pass):
- `mm_vocab_size`, `image_vocab_size`, `num_mm_adap_layers`, `num_mm_head_layers` (model shape; from the
  model config, see hf_io.hf_config_for), `mm_special_tokens` (the <SOM>, <EOM>, <IMAGE> strings);
- `vision_config.dtype`;
- `vision_config.transform`, passed as keyword arguments to its any-resolution preprocess: short_size,
  long_size, patch_size, min_short_size, max_aspect_ratio, filtering;
- `vision_config.encoder`, passed as keyword arguments to its tokenizer class (so exactly these keys):
  siglip_name, siglip_path, projector_path, z_channels, codebook_size, codebook_dim, with_norm;
- `vision_config.decoder`: model_path (folder of the FLUX transformer), upscale_factor (pixels per token
  side), num_inference_steps, cfg_scale, cfg_scale_2;
- `bos_token_id` / `eos_token_id` (generation): the tokenizer's; a tokenizer without BOS (Qwen's, the tiny
  one) leaves the source config's bos_token_id.
Paths are absolute (the released code joins them to the model folder, which keeps absolute paths). The
weights behind them are in this project's formats (one SigLIP-VQ model.safetensors; a diffusers decoder),
which the released loader's own ViT/projector readers do not read: the fields describe the run, they do
not convert the tokenizer or decoder weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_xomni.conversion import ConversionError


@dataclass
class RunParts:
    """The run's own tokenizer and decoder folders (the CLI's --text-tokenizer/--image-tokenizer/--decoder)."""

    text_tokenizer: Optional[str] = None
    image_tokenizer: Optional[str] = None
    decoder: Optional[str] = None

    @property
    def vision(self) -> bool:
        return self.image_tokenizer is not None or self.decoder is not None


def _bos_id(tok) -> Optional[int]:
    # BOS is not part of XOmniTextTokenizer's interface (the sequence format adds none); ask its backend.
    backend = tok._backend
    bos = backend.bos_id() if tok.kind == "sentencepiece" else backend.bos_token_id
    return int(bos) if bos is not None and bos >= 0 else None


def xomni_fields(ckpt: Path, mcfg, parts: RunParts) -> dict:
    """config.json fields from `parts` (checked against the checkpoint's model config first, no weights read).
    vision_config.dtype is left for the caller, who decides the export dtype."""
    from megatron_xomni.data.text_tokenizer import SPECIAL_TOKENS, XOmniTextTokenizer
    from megatron_xomni.inference.bundle import PipelinePaths, inspect_paths
    from megatron_xomni.models.flux_decoder.config import TOKEN_PIXELS
    from megatron_xomni.models.flux_decoder.model import TRANSFORMER_DIR
    from megatron_xomni.models.siglip_vq.model import WEIGHTS_NAME

    if parts.vision and not (parts.image_tokenizer and parts.decoder and parts.text_tokenizer):
        raise ConversionError("vision_config needs the run's three folders: pass --text-tokenizer, "
                              "--image-tokenizer and --decoder together")
    if parts.text_tokenizer is None:
        return {}
    spec = None
    try:
        if parts.vision:  # cross-checks tokenizers, decoder and the model config (configs only)
            spec = inspect_paths(PipelinePaths(model=str(ckpt), text_tokenizer=parts.text_tokenizer,
                                               image_tokenizer=parts.image_tokenizer, decoder=parts.decoder))
        tok = spec.text_tokenizer if spec else XOmniTextTokenizer.load(parts.text_tokenizer)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    tokens = mcfg.text_vocab_size - mcfg.text_vocab_padding
    if tok.vocab_size > tokens:
        raise ConversionError(f"text tokenizer {parts.text_tokenizer} has {tok.vocab_size} ids but the model's text "
                              f"vocabulary has {tokens}: pass the run's own --text-tokenizer")
    fields = {"eos_token_id": tok.eos_id, "mm_special_tokens": list(SPECIAL_TOKENS)}
    if _bos_id(tok) is not None:  # else the source config's bos_token_id stands (Qwen's tokenizer has no BOS)
        fields["bos_token_id"] = _bos_id(tok)
    if spec is None:
        return fields
    icfg, dcfg, pre = spec.image_config, spec.decoder_config, spec.preprocess_config()
    image_dir, decoder_dir = Path(parts.image_tokenizer).resolve(), Path(parts.decoder).resolve()
    fields["vision_config"] = {
        "dtype": None,
        "transform": {"short_size": pre.min_short, "long_size": pre.max_long, "patch_size": pre.multiple,
                      "min_short_size": pre.min_short_reject, "max_aspect_ratio": pre.max_aspect_ratio,
                      "filtering": True},
        "encoder": {"siglip_name": "megatron_xomni.siglip_vq", "siglip_path": str(image_dir / WEIGHTS_NAME),
                    "projector_path": str(image_dir / WEIGHTS_NAME), "z_channels": icfg.adapter_dim,
                    "codebook_size": icfg.codebook_size, "codebook_dim": icfg.codebook_dim, "with_norm": True},
        "decoder": {"model_path": str(decoder_dir / TRANSFORMER_DIR), "upscale_factor": TOKEN_PIXELS,
                    "num_inference_steps": dcfg.num_inference_steps, "cfg_scale": 1.0, "cfg_scale_2": 1.0},
    }
    return fields
