"""Where the four parts of an X-Omni model live, and whether they fit together.

Everything here reads configuration files (model_config.json, the tokenizers' configs,
decoder_config.json), file headers and sizes (megatron_xomni.file_checks: dist-ckpt parts,
safetensors headers) and the small text tokenizer: a wrong, empty or damaged file, a tokenizer that does not
match the model, a decoder trained on another tokenizer or an impossible image size is reported
as one ValueError line naming the fix, before a single weight is loaded or a process group starts.

A bundle is a folder with the four parts as subfolders:

    bundle/model/             megatron_xomni checkpoint root (iter_*/ + latest_checkpointed_iteration.txt)
    bundle/text_tokenizer/    XOmniTextTokenizer.save output (or a local HF tokenizer folder)
    bundle/image_tokenizer/   SiglipVQTokenizer.save_pretrained output
    bundle/decoder/           XOmniDecoder.save_pretrained output (diffusers layout)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_xomni.file_checks import check_dist_checkpoint, read_json, require_dir

BUNDLE_PARTS = ("model", "text_tokenizer", "image_tokenizer", "decoder")
PREPROCESS_CHOICES = ("auto", "tiny", "xomni")
# model_config.json fields that fix the weight shapes: without them the file cannot describe the checkpoint
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                      "text_vocab_size", "image_vocab_size", "image_table_size", "num_vision_adapter_layers",
                      "num_vision_head_layers")


@dataclass
class PipelinePaths:
    """Explicit locations of the model parts."""

    model: str
    """megatron_xomni checkpoint root (holds latest_checkpointed_iteration.txt) or one iter_* folder."""
    text_tokenizer: str
    """Text tokenizer folder (XOmniTextTokenizer.load)."""
    image_tokenizer: str
    """SigLIP-VQ tokenizer folder (config.json + model.safetensors)."""
    decoder: Optional[str] = None
    """Diffusion decoder export (decoder_config.json + transformer/ + vae/ ...); None: no image decoding
    (understanding only, or codes only)."""
    iteration: Optional[int] = None
    """Checkpoint iteration to load; None: the latest complete one."""

    @classmethod
    def from_bundle(cls, bundle: str | Path, iteration: Optional[int] = None,
                    require_decoder: bool = True) -> "PipelinePaths":
        """The four subfolders of a bundle (see the module docstring)."""
        root = require_dir(bundle, "bundle", f"pass a folder with subfolders {', '.join(BUNDLE_PARTS)}")
        dec = root / "decoder"
        if require_decoder and not dec.is_dir():
            raise ValueError(f"bundle {root} has no decoder/ subfolder: export the decoder there or pass --decoder")
        return cls(model=str(root / "model"), text_tokenizer=str(root / "text_tokenizer"),
                   image_tokenizer=str(root / "image_tokenizer"), decoder=str(dec) if dec.is_dir() else None,
                   iteration=iteration)


@dataclass
class PipelineSpec:
    """What the configuration files say, validated (see `inspect_paths`)."""

    paths: PipelinePaths
    """Where the parts are."""
    checkpoint: Path
    """The resolved iter_* folder of the AR model."""
    model_config: object
    """XOmniModelConfig read from the checkpoint's model_config.json."""
    text_tokenizer: object
    """The loaded XOmniTextTokenizer (small; needed to validate vocabularies and prompts)."""
    image_config: object
    """SigLIPVQConfig of the image tokenizer."""
    decoder_config: Optional[object]
    """DecoderConfig of the decoder export, None without a decoder."""

    @property
    def patch_size(self) -> int:
        """Pixels per image token side."""
        return int(self.image_config.patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) token grid of an image size; ValueError naming the fix unless both are positive multiples
        of the image tokenizer's patch size."""
        from megatron_xomni.data.image_grid import ImageGrid

        return ImageGrid.from_pixels(height, width, self.patch_size).shape

    def check_prompts(self, prompts: Sequence[str], height: int, width: int) -> tuple[int, int]:
        """Validate prompts for one image size (text without reserved tokens, sequence fits); returns the grid."""
        from megatron_xomni.data.text_tokenizer import SPECIAL_TOKENS

        h, w = self.grid(height, width)
        if not prompts:
            raise ValueError("no prompts given: pass --prompt or --prompts-file")
        limit = int(self.model_config.max_position_embeddings)
        header = len(self.text_tokenizer.encode(f"{h} {w}")) + 2
        for n, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {n} is a {type(prompt).__name__}, not text")
            bad = [t for t in SPECIAL_TOKENS if t in prompt]
            if bad:
                raise ValueError(f"prompt {n} contains the reserved token {bad[0]!r}; remove it from the text")
            total = len(self.text_tokenizer.encode(prompt)) + header + h * w + 1
            if total > limit:
                raise ValueError(f"prompt {n} needs {total} positions ({h}x{w} image) but the model has "
                                 f"max_position_embeddings={limit}: use a smaller size or a shorter prompt")
        return h, w

    def check_generation(self, prompts: Sequence[str], height: int, width: int) -> tuple[int, int]:
        """`check_prompts` plus: a decoder is configured (images need one)."""
        if self.decoder_config is None:
            raise ValueError("generating images needs a decoder: pass --decoder (or a bundle with decoder/)")
        return self.check_prompts(prompts, height, width)

    def preprocess_config(self, name: str = "auto"):
        """ImagePreprocessConfig for understanding inputs.

        "auto": the tiny rules (64..192 px) when the tokenizer's learned position grid covers less than
        the X-Omni minimum short side (384 px), i.e. for the tiny tokenizer; X-Omni's rules otherwise.
        """
        from megatron_xomni.data.preprocess import ImagePreprocessConfig

        if name not in PREPROCESS_CHOICES:
            raise ValueError(f"preprocess={name!r}: use one of {PREPROCESS_CHOICES}")
        if name == "auto":
            covered = int(self.image_config.pos_grid) * self.patch_size
            name = "tiny" if covered < ImagePreprocessConfig().min_short else "xomni"
        cfg = ImagePreprocessConfig.tiny() if name == "tiny" else ImagePreprocessConfig()
        if cfg.multiple % self.patch_size:
            raise ValueError(f"preprocessing rounds sizes to {cfg.multiple} px, not a multiple of the tokenizer "
                             f"patch {self.patch_size}: use a tokenizer with patch {cfg.multiple}")
        return cfg


def _resolve_model(paths: PipelinePaths) -> Path:
    from megatron_xomni.checkpointing import LATEST, resolve_checkpoint

    root = require_dir(paths.model, "model checkpoint", "pass the checkpoint root of a training run or of "
                       "xomni convert")
    if (root / "model_config.json").exists() and not (root / LATEST).exists():
        return root  # an iter_* folder given directly
    try:
        return resolve_checkpoint(root, paths.iteration)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(str(e)) from None


def _model_config(ckpt: Path):
    from megatron_xomni.models.xomni.config import XOmniModelConfig

    path = ckpt / "model_config.json"
    mdict = read_json(path, "model config", "restore it from the run that wrote the checkpoint, or re-convert "
                      "the checkpoint (xomni convert)", required=MODEL_SHAPE_FIELDS)
    try:
        mcfg = XOmniModelConfig.from_dict(mdict)
        mcfg.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return mcfg


def inspect_paths(paths: PipelinePaths) -> PipelineSpec:
    """Read and cross-check the configurations; no weights are loaded. ValueError (one line) on any problem."""
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.models.siglip_vq.model import check_pretrained

    # Existence first, so the error names the first missing part rather than a mismatch.
    for name in ("text_tokenizer", "image_tokenizer", "decoder"):
        value = getattr(paths, name)
        if value is not None:
            require_dir(value, f"{name.replace('_', ' ')} folder", f"check --{name.replace('_', '-')}")
    ckpt = _resolve_model(paths)
    mcfg = _model_config(ckpt)
    check_dist_checkpoint(ckpt, "re-save the checkpoint, or re-convert it (xomni convert)")

    text_tok = XOmniTextTokenizer.load(paths.text_tokenizer)
    text_tok.check_text_vocab(mcfg.text_vocab_size)

    icfg = check_pretrained(paths.image_tokenizer)
    if int(mcfg.image_vocab_size) != int(icfg.codebook_size):
        raise ValueError(f"model image_vocab_size={mcfg.image_vocab_size} != image tokenizer codebook size "
                         f"{icfg.codebook_size}: use the image tokenizer the model was trained with")

    dcfg = None
    if paths.decoder is not None:
        from megatron_xomni.models.flux_decoder.config import check_decoder_patch, decoder_adapter_dim
        from megatron_xomni.models.flux_decoder.model import check_export

        dcfg = check_export(paths.decoder)
        check_decoder_patch(int(icfg.patch_size), dcfg)
        if int(dcfg.adapter_dim) != decoder_adapter_dim(icfg.adapter_dim, icfg.patch_size):
            raise ValueError(f"decoder adapter_dim={dcfg.adapter_dim} != image tokenizer adapter_dim="
                             f"{icfg.adapter_dim} (patch {icfg.patch_size}): use the decoder trained on this image "
                             "tokenizer's features")
    return PipelineSpec(paths=paths, checkpoint=ckpt, model_config=mcfg, text_tokenizer=text_tok,
                        image_config=icfg, decoder_config=dcfg)
