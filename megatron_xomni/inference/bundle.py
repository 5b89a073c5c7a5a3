"""Where the four parts of an X-Omni model live, and whether they fit together.

Everything here reads configuration files only (model_config.json, the tokenizers' configs,
decoder_config.json) and the small text tokenizer: a wrong path, a tokenizer that does not
match the model, a decoder trained on another tokenizer or an impossible image size is reported
as one ValueError line naming the fix, before a single weight is loaded or a process group starts.

A bundle is a folder with the four parts as subfolders:

    bundle/model/             megatron_xomni checkpoint root (iter_*/ + latest_checkpointed_iteration.txt)
    bundle/text_tokenizer/    XOmniTextTokenizer.save output (or a local HF tokenizer folder)
    bundle/image_tokenizer/   SiglipVQTokenizer.save_pretrained output
    bundle/decoder/           XOmniDecoder.save_pretrained output (diffusers layout)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

BUNDLE_PARTS = ("model", "text_tokenizer", "image_tokenizer", "decoder")
PREPROCESS_CHOICES = ("auto", "tiny", "xomni")


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
        root = Path(bundle)
        if not root.is_dir():
            raise ValueError(f"bundle {root} does not exist: pass a folder with subfolders {', '.join(BUNDLE_PARTS)}")
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
        of the patch size."""
        p = self.patch_size
        if height <= 0 or width <= 0 or height % p or width % p:
            fix_h = max(p, round(height / p) * p)
            fix_w = max(p, round(width / p) * p)
            raise ValueError(f"image size {height}x{width} is not a multiple of the {p}-pixel token grid: "
                             f"use e.g. {fix_h}x{fix_w}")
        return height // p, width // p

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


def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist; {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} holds a {type(data).__name__}, not an object; {fix}")
    return data


def _resolve_model(paths: PipelinePaths) -> Path:
    from megatron_xomni.checkpointing import LATEST, resolve_checkpoint

    root = Path(paths.model)
    if not root.exists():
        raise ValueError(f"model checkpoint {root} does not exist: pass the checkpoint root of a training run "
                         "or of tools/convert_checkpoint.py")
    if (root / "model_config.json").is_file() and not (root / LATEST).exists():
        return root  # an iter_* folder given directly
    try:
        return resolve_checkpoint(root, paths.iteration)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(str(e)) from None


def inspect_paths(paths: PipelinePaths) -> PipelineSpec:
    """Read and cross-check the configurations; no weights are loaded. ValueError (one line) on any problem."""
    from megatron_xomni.models.xomni.config import XOmniModelConfig
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer
    from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig

    # Existence first, so the error names the first missing part rather than a mismatch.
    for name in ("text_tokenizer", "image_tokenizer", "decoder"):
        value = getattr(paths, name)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"{name.replace('_', ' ')} folder {value} does not exist: check --{name.replace('_', '-')}")
    ckpt = _resolve_model(paths)
    mdict = _read_json(ckpt / "model_config.json", "model config",
                       "the checkpoint was not written by megatron_xomni (convert it with tools/convert_checkpoint.py)")
    try:
        mcfg = XOmniModelConfig.from_dict(mdict)
        mcfg.validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt / 'model_config.json'}: {e}") from None

    text_tok = XOmniTextTokenizer.load(paths.text_tokenizer)
    text_tok.check_text_vocab(mcfg.text_vocab_size)

    icfg_dict = _read_json(Path(paths.image_tokenizer) / "config.json", "image tokenizer config",
                           "pass a folder written by SiglipVQTokenizer.save_pretrained")
    try:
        icfg = SigLIPVQConfig.from_dict(icfg_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{paths.image_tokenizer}/config.json: {e}") from None
    if not (Path(paths.image_tokenizer) / "model.safetensors").is_file():
        raise ValueError(f"image tokenizer {paths.image_tokenizer} has no model.safetensors; "
                         "save it with SiglipVQTokenizer.save_pretrained")
    if int(mcfg.image_vocab_size) != int(icfg.codebook_size):
        raise ValueError(f"model image_vocab_size={mcfg.image_vocab_size} != image tokenizer codebook size "
                         f"{icfg.codebook_size}: use the image tokenizer the model was trained with")

    dcfg = None
    if paths.decoder is not None:
        from megatron_xomni.models.flux_decoder.config import TOKEN_PIXELS, DecoderConfig

        dpath = Path(paths.decoder) / "decoder_config.json"
        if not dpath.is_file():
            raise ValueError(f"decoder {paths.decoder} has no decoder_config.json: pass a folder written by "
                             "XOmniDecoder.save_pretrained (or tools' decoder export)")
        try:
            dcfg = DecoderConfig.from_json(dpath)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{dpath}: {e}") from None
        if int(dcfg.adapter_dim) != int(icfg.adapter_dim):
            raise ValueError(f"decoder adapter_dim={dcfg.adapter_dim} != image tokenizer adapter_dim="
                             f"{icfg.adapter_dim}: use the decoder trained on this image tokenizer's features")
        if int(icfg.patch_size) != TOKEN_PIXELS:
            raise ValueError(f"image tokenizer patch {icfg.patch_size} px != decoder token size {TOKEN_PIXELS} px: "
                             "their grids would not align; use a patch-16 tokenizer")
        frozen = Path(dcfg.pretrained_path) if dcfg.pretrained_path else Path(paths.decoder)
        if not (frozen / "vae").is_dir():
            raise ValueError(f"decoder VAE folder {frozen / 'vae'} does not exist: re-export the decoder with "
                             "save_frozen=True or restore its pretrained_path")
    return PipelineSpec(paths=paths, checkpoint=ckpt, model_config=mcfg, text_tokenizer=text_tok,
                        image_config=icfg, decoder_config=dcfg)
