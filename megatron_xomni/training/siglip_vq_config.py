"""The run config of SigLIP-VQ tokenizer training (X-Omni section 1): the run section plus typed sections.

    python -m megatron_xomni.train tiny_siglip_vq data.corpus=runs/tiny/corpus steps=600
    torchrun --nproc-per-node 8 -m megatron_xomni.train xomni_siglip_vq data.corpus=/data/cc12m

Outputs under `save_dir`: `iter_N/` resumable checkpoints (CheckpointManager + DCP payload),
`teacher/` (the warmed, frozen LLM, written once), `metrics.jsonl` + `tensorboard/`, and at the end
`export/` -- `export/tokenizer` (SiglipVQTokenizer.save_pretrained: what tokenization, the decoder
and inference read), `export/projector.safetensors` and `export/summary.json` (eval before/after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from megatron_xomni.dataclass_utils import check_numbers
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.run import InputError, RunSection
from megatron_xomni.training.schedule import ScheduleConfig

PREPROCESS = ("tiny", "xomni")
EXPORT = "export"


@dataclass
class TokenizerSection:
    """The image tokenizer being trained, and the LLaVA projector in front of the teacher."""

    preset: str = "tiny"
    """`tokenizer_config` preset: tiny | xomni (SigLIP2-giant encoder, 16384 x 2048 codebook)."""
    overrides: dict = field(default_factory=dict)
    """SigLIPVQConfig fields overriding the preset (e.g. {"skip_quant_prob": 0.0})."""
    init_from: Optional[str] = None
    """Start from a SiglipVQTokenizer.save_pretrained folder instead of a random tokenizer."""
    siglip_path: Optional[str] = None
    """Local SigLIP/SigLIP2 vision checkpoint (safetensors file or folder) to initialise the encoder."""
    freeze_encoder: bool = False
    """Keep the ViT fixed and train only quantizer + adapter + projector."""
    projector: str = "mlp"
    """mlp (LLaVA-1.5: Linear, GELU, Linear) | linear (LLaVA-1)."""


@dataclass
class TeacherSection:
    """The frozen text LLM whose caption loss trains the tokenizer."""

    preset: str = "tiny"
    """`model_preset` of a random teacher (ignored when `checkpoint` carries its own config)."""
    checkpoint: Optional[str] = None
    """A trained LLM: a megatron dist-ckpt root (e.g. Qwen2.5-1.5B from `xomni convert hf-to-megatron
    --vision-layers 0 0`) or a teacher folder written by this trainer."""
    warmup_steps: int = 0
    """Text-only LM steps on the corpus' captions + QA before freezing (a random teacher is a weak one)."""
    warmup_lr: float = 2e-3
    """AdamW learning rate of the warm-up."""
    warmup_batch_size: int = 32
    """Texts per warm-up step."""
    warmup_records: int = 2000
    """Corpus records whose caption + QA texts form the warm-up set."""


@dataclass
class CaptionDataConfig:
    """Image-caption(+QA) batches from a WebDataset corpus."""

    corpus: str = ""
    """Corpus folder (megatron_xomni.data: index.json + shard-*.tar; `xomni corpus` or the built-in world)."""
    batch_size: int = 16
    """Global batch: images per step over all ranks (a multiple of the world size)."""
    text_tokenizer: str = ""
    """Text tokenizer folder of the teacher (the text-tokenizer stage's save_dir)."""
    preprocess: str = "tiny"
    """Image size rules: tiny (64 px world images) | xomni (short side >= 384, long side <= 1152)."""
    max_qa_pairs: int = 8
    """Question/answer pairs of meta["qa"] appended to the caption (0: caption only)."""
    max_text_tokens: int = 128
    """Text tokens per sample, EOS included (longer texts are cut)."""


@dataclass
class CodebookSection:
    """Quantizer loss weight and dead-code re-seeding."""

    aux_loss_weight: float = 1.0
    """Weight of the quantizer loss (index + codebook + commitment) added to the caption loss."""
    reseed_every: int = 50
    """Re-seed dead codes every this many steps (0 disables)."""
    reseed_min_count: int = 1
    """A code is dead when chosen fewer times than this since the last re-seed (all ranks)."""
    reseed_until: Optional[int] = None
    """Last step at which re-seeding may happen (None: until the end)."""


@dataclass
class TinyAuxSection:
    """Auxiliary terms measured to help the *tiny* preset (not X-Omni's recipe; see training/siglip_vq_aux.py).
    All off by default: the caption loss alone is X-Omni's."""

    pixel_weight: float = 0.0
    """Weight of a pixel-regression head on the adapter features (0: no head)."""
    object_alpha: float = 0.0
    """Token weight of that pixel loss: 1 + object_alpha * (the token's foreground fraction)."""
    encoder_lr_mult: float = 1.0
    """The ViT's learning rate as a multiple of optim.lr (a pre-trained encoder may train slower; 0 is
    tokenizer.freeze_encoder)."""


@dataclass
class TokenizerEvalConfig:
    """Held-out caption(+QA) loss, the same with shuffled images, codebook usage: before and after training."""

    world_samples: int = 0
    """Held-out built-in world images (0: none)."""
    image_size: int = 64
    """Side of the held-out world images."""
    corpus: Optional[str] = None
    """A held-out corpus folder (its first `corpus_samples` records), instead of or besides the world."""
    corpus_samples: int = 64
    batch_size: int = 32
    """Images per evaluation batch (same-size images are batched together)."""


@dataclass
class SiglipVQRunConfig(RunSection):
    """One SigLIP-VQ training run (the run section's fields come first, training/run.py)."""

    RUNNER: ClassVar[str] = "megatron_xomni.training.siglip_vq_trainer:train_siglip_vq"
    RENAMED_FIELDS: ClassVar[dict] = {
        "weight_decay": "optim.weight_decay", "batch_size": "data.batch_size", "corpus": "data.corpus",
        "text_tokenizer": "data.text_tokenizer", "max_qa_pairs": "data.max_qa_pairs",
        "max_text_tokens": "data.max_text_tokens", "tokenizer_preset": "tokenizer.preset",
        "tokenizer_overrides": "tokenizer.overrides", "init_tokenizer": "tokenizer.init_from",
        "siglip_weights": "tokenizer.siglip_path", "freeze_encoder": "tokenizer.freeze_encoder",
        "projector": "tokenizer.projector", "llm_preset": "teacher.preset", "llm_checkpoint": "teacher.checkpoint",
        "llm_warmup_steps": "teacher.warmup_steps", "llm_warmup_lr": "teacher.warmup_lr",
        "llm_warmup_batch_size": "teacher.warmup_batch_size", "llm_warmup_records": "teacher.warmup_records",
        "aux_loss_weight": "codebook.aux_loss_weight", "reseed_every": "codebook.reseed_every",
        "reseed_min_count": "codebook.reseed_min_count", "reseed_until": "codebook.reseed_until",
        "eval_world": "eval.world_samples", "image_size": "eval.image_size",
    }

    name: str = "siglip_vq"
    save_dir: str = "runs/siglip_vq"
    save_interval: int = 100
    keep_last: Optional[int] = 2
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta2=0.999, clip_grad=1.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(style="constant", warmup_steps=20))
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    codebook: CodebookSection = field(default_factory=CodebookSection)
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)
    aux: TinyAuxSection = field(default_factory=TinyAuxSection)

    @property
    def export_dir(self) -> Path:
        """What downstream stages read: <save_dir>/export/tokenizer (+ projector, summary)."""
        return Path(self.save_dir) / EXPORT

    def tokenizer_config(self):
        from megatron_xomni.models.siglip_vq.config import tokenizer_config

        return tokenizer_config(self.tokenizer.preset, **{**self.tokenizer.overrides,
                                                          "freeze_encoder": self.tokenizer.freeze_encoder})

    def validate(self, world_size: int) -> None:
        """One-line ValueError naming the fix (layout and types only: no paths, no process groups)."""
        from megatron_xomni.models.xomni import model_preset

        self.validate_run()
        self.optim.validate()
        if self.optim.use_distributed_optimizer or self.optim.overlap_grad_reduce:
            raise ValueError("optim.use_distributed_optimizer/overlap_grad_reduce are megatron-core optimizer "
                             "settings; the SigLIP-VQ trainer runs torch AdamW under DDP: set them false")
        self.schedule.validate(self.steps)
        d, t, c, e = self.data, self.teacher, self.codebook, self.eval
        check_numbers({"data.batch_size": d.batch_size, "data.max_text_tokens": d.max_text_tokens,
                       "teacher.warmup_batch_size": t.warmup_batch_size, "teacher.warmup_records": t.warmup_records,
                       "codebook.reseed_min_count": c.reseed_min_count, "eval.image_size": e.image_size,
                       "eval.batch_size": e.batch_size}, 1)
        check_numbers({"data.max_qa_pairs": d.max_qa_pairs, "teacher.warmup_steps": t.warmup_steps,
                       "codebook.reseed_every": c.reseed_every, "eval.world_samples": e.world_samples,
                       "eval.corpus_samples": e.corpus_samples}, 0)
        check_numbers({"codebook.reseed_until": c.reseed_until}, 0, optional=True)
        check_numbers({"teacher.warmup_lr": t.warmup_lr, "codebook.aux_loss_weight": c.aux_loss_weight,
                       "aux.pixel_weight": self.aux.pixel_weight, "aux.object_alpha": self.aux.object_alpha,
                       "aux.encoder_lr_mult": self.aux.encoder_lr_mult}, 0, integer=False)
        if self.aux.encoder_lr_mult == 0 and not self.tokenizer.freeze_encoder:
            raise ValueError("aux.encoder_lr_mult=0 would train a ViT at lr 0: set tokenizer.freeze_encoder=true instead")
        if d.batch_size % world_size:
            raise ValueError(f"data.batch_size={d.batch_size} is not a multiple of the {world_size} ranks: "
                             f"use a multiple of {world_size}")
        if self.tokenizer.projector not in ("mlp", "linear"):
            raise ValueError(f"tokenizer.projector={self.tokenizer.projector!r}: use mlp or linear")
        if d.preprocess not in PREPROCESS:
            raise ValueError(f"data.preprocess={d.preprocess!r}: use tiny or xomni")
        if not isinstance(self.tokenizer.overrides, dict):
            raise ValueError(f"tokenizer.overrides={self.tokenizer.overrides!r} is not a JSON object of "
                             "SigLIPVQConfig fields")
        try:
            self.tokenizer_config()
        except TypeError as err:  # an unknown SigLIPVQConfig field
            raise ValueError(f"tokenizer.overrides: {err}") from None
        if not t.checkpoint:
            model_preset(t.preset)
        if not d.corpus:
            raise ValueError("data.corpus is empty: point it at a corpus folder (xomni corpus, or the built-in "
                             "world via megatron_xomni.data.write_world_corpus)")
        if not d.text_tokenizer:
            raise ValueError("data.text_tokenizer is empty: train one first (python -m megatron_xomni.train "
                             "tiny_text_tokenizer) and pass its save_dir")

    def check_paths(self) -> None:
        """Local inputs exist (InputError, one line, exit 2); run when the job starts."""
        from megatron_xomni.file_checks import BadFile, require_dir

        corpus = Path(self.data.corpus)
        if not (corpus / "index.json").is_file():
            raise InputError(f"data.corpus={corpus} is not a corpus folder (no index.json): build one with "
                             "xomni corpus, or fix the path")
        if self.eval.corpus and not (Path(self.eval.corpus) / "index.json").is_file():
            raise InputError(f"eval.corpus={self.eval.corpus} is not a corpus folder (no index.json)")
        named = [("data.text_tokenizer", self.data.text_tokenizer, "train the text tokenizer first"),
                 ("teacher.checkpoint", self.teacher.checkpoint, "convert the LLM with xomni convert hf-to-megatron"),
                 ("tokenizer.init_from", self.tokenizer.init_from, "give a SiglipVQTokenizer.save_pretrained folder")]
        for key, value, fix in named:
            if value:
                try:
                    require_dir(value, key, fix)
                except BadFile as err:
                    raise InputError(str(err)) from None
        if self.tokenizer.siglip_path and not Path(self.tokenizer.siglip_path).exists():
            raise InputError(f"tokenizer.siglip_path={self.tokenizer.siglip_path} does not exist: download the "
                             "SigLIP2 checkpoint to a local folder and point at it")
