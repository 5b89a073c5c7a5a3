"""The text tokenizer as a stage: `python -m megatron_xomni.train tiny_text_tokenizer [key=value ...]`.

Builds the folder megatron_xomni.data.text_tokenizer.XOmniTextTokenizer.load reads, with X-Omni's
`<SOM>`, `<EOM>`, `<IMAGE>` as single ids, from one of:

- `source=world`: sentencepiece BPE on the built-in world's captions and QA (the tiny preset: 512 ids);
- `source=corpus`: sentencepiece BPE on a corpus' captions and QA (no image is decoded);
- `source=text`: sentencepiece BPE on a UTF-8 file, one training text per line;
- `source=hf`: a local Hugging Face tokenizer folder (X-Omni: Qwen2.5's), the three specials added.

How the run section maps: `save_dir` is the tokenizer folder itself (what later stages' `text_tokenizer=`
points at); it is written to `<save_dir>.tmp` and renamed, so it appears complete or not at all, with the
settings that made it in `stage.json`. A rerun with the same settings finds it and does nothing; other
settings are refused (pick another save_dir). `seed` is the world source's sample seed;
`debug_kill=in_save:1` SIGKILLs the run after the folder is written, before it is published. `steps`,
`save_interval`, `keep_last` and `log_interval` do not apply (nothing is iterative here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from megatron_xomni.dataclass_utils import check_numbers
from megatron_xomni.training import faults
from megatron_xomni.training.run import EXIT_OK, InputError, RunSection

SOURCES = ("world", "corpus", "text", "hf")
STAGE_FILE = "stage.json"
# Run-section knobs that do not change the tokenizer (a rerun with other values finds the same output).
_NOT_SETTINGS = ("name", "save_dir", "steps", "save_interval", "keep_last", "log_interval", "debug_kill")


@dataclass
class TextTokenizerRunConfig(RunSection):
    """One text tokenizer build (see the module docstring)."""

    RUNNER: ClassVar[str] = "megatron_xomni.training.text_tokenizer:build_text_tokenizer"
    DISTRIBUTED: ClassVar[bool] = False
    RENAMED_FIELDS: ClassVar[dict] = {"out_dir": "save_dir", "num_samples": "world_samples", "hf": "hf_path",
                                      "no_byte_fallback": "byte_fallback"}

    name: str = "text_tokenizer"
    seed: int = 0
    save_dir: str = "runs/text_tokenizer"
    source: str = "world"
    """world | corpus | text | hf (see the module docstring)."""
    vocab_size: int = 512
    """sentencepiece vocabulary (an upper bound: small corpora cannot fill large vocabularies)."""
    byte_fallback: bool = True
    """sentencepiece: 256 byte pieces, so any UTF-8 text encodes without <unk>."""
    world_samples: int = 2000
    """source=world: world images whose caption + QA text is used."""
    corpus: str = ""
    """source=corpus: corpus folder (index.json + shards)."""
    corpus_records: int = 0
    """source=corpus: records read (0: all)."""
    text_file: str = ""
    """source=text: UTF-8 file, one training text per line."""
    hf_path: str = ""
    """source=hf: local folder with the HF tokenizer files (tokenizer.json, tokenizer_config.json, ...)."""
    text_vocab_size: Optional[int] = None
    """The AR model's text table (tiny 512, Qwen2.5-7B 152064): the tokenizer must fit it (None: no check)."""

    def validate(self, world_size: int = 1) -> None:
        self.validate_run()
        if world_size > 1:
            raise ValueError("the text tokenizer is built by one process: run it without torchrun "
                             "(python -m megatron_xomni.train RECIPE ...)")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: use one of {', '.join(SOURCES)}")
        check_numbers({"vocab_size": self.vocab_size, "world_samples": self.world_samples}, 1)
        check_numbers({"corpus_records": self.corpus_records}, 0)
        check_numbers({"text_vocab_size": self.text_vocab_size}, 1, optional=True)
        needs = {"corpus": self.corpus, "text": self.text_file, "hf": self.hf_path}
        key = {"corpus": "corpus", "text": "text_file", "hf": "hf_path"}.get(self.source)
        if key and not needs[self.source]:
            raise ValueError(f"source={self.source} needs {key}=...")

    def check_paths(self) -> None:
        if self.source == "corpus" and not (Path(self.corpus) / "index.json").is_file():
            raise InputError(f"corpus={self.corpus} is not a corpus folder (no index.json): build one with xomni corpus")
        if self.source == "text" and not Path(self.text_file).is_file():
            raise InputError(f"text_file={self.text_file} does not exist: give a UTF-8 file, one text per line")
        if self.source == "hf" and not Path(self.hf_path).is_dir():
            raise InputError(f"hf_path={self.hf_path} is not a folder: download the tokenizer files "
                             "(tokenizer.json, tokenizer_config.json) of the base model there")

    def settings(self) -> dict:
        """What the output depends on (saved as stage.json)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_SETTINGS}


def _texts(cfg: TextTokenizerRunConfig) -> list[str]:
    from megatron_xomni.data.caption_batches import corpus_caption_texts
    from megatron_xomni.data.text_tokenizer import world_texts

    if cfg.source == "world":
        return world_texts(cfg.world_samples, cfg.seed)
    if cfg.source == "corpus":
        return corpus_caption_texts(cfg.corpus, cfg.corpus_records)
    return Path(cfg.text_file).read_text(encoding="utf-8").splitlines()


def make_text_tokenizer(cfg: TextTokenizerRunConfig):
    """The XOmniTextTokenizer the config describes (nothing written)."""
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece

    if cfg.source == "hf":
        tok = XOmniTextTokenizer.from_hf(cfg.hf_path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = train_sentencepiece(_texts(cfg), Path(tmp) / "spm", cfg.vocab_size, byte_fallback=cfg.byte_fallback)
            tok = XOmniTextTokenizer.from_sentencepiece(model)
    if cfg.text_vocab_size is not None:
        tok.check_text_vocab(cfg.text_vocab_size)
    return tok


def build_text_tokenizer(cfg: TextTokenizerRunConfig) -> int:
    """The stage's RUNNER: checks, builds, publishes <save_dir> atomically; returns the exit code."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    cfg.check_paths()
    out = Path(cfg.save_dir)
    if out.exists():
        stage = out / STAGE_FILE
        saved = json.loads(stage.read_text()) if stage.is_file() else None
        if saved != json.loads(json.dumps(cfg.settings())):
            what = "other settings" if saved is not None else f"no {STAGE_FILE}"
            raise InputError(f"save_dir={out} already holds a text tokenizer ({what}): pick another save_dir, "
                             "or delete it to rebuild")
        print(f"[{cfg.name}] {out} is complete (same settings): nothing to do", flush=True)
        return EXIT_OK
    tok = make_text_tokenizer(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    (tmp / STAGE_FILE).write_text(json.dumps(cfg.settings(), indent=2, sort_keys=True) + "\n")
    faults.fire("in_save", 1, cfg.debug_kill)
    os.replace(tmp, out)
    print(f"[{cfg.name}] wrote {out}: vocab {tok.vocab_size}, special ids {tok.special_ids}", flush=True)
    return EXIT_OK
