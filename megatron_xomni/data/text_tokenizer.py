"""The text tokenizer of the AR model: a sentencepiece model (tiny preset) or a local HF tokenizer (Qwen2.5).

X-Omni adds three multimodal special tokens to the text vocabulary: `<SOM>` (start of image), `<EOM>`
(end of image) and `<IMAGE>` (end of the grid-size header, after which image codes follow). Each must be
one id, never split. Image code k is not a text token: it has id `text_vocab_size + k`, where
`text_vocab_size` is the row count of the model's text embedding (Qwen pads its 151,665 tokens to 152,064;
the tiny preset uses 512), so the model table must hold every tokenizer id: `check_text_vocab` says so.

Saved layout (a folder):
    text_tokenizer.json    {"kind": "sentencepiece" | "hf", "special_tokens": [...], "model_file": ...}
    spm.model              (sentencepiece kind) the trained model
    tokenizer.json, ...    (hf kind) what `save_pretrained` writes
A plain HF tokenizer folder (e.g. a downloaded Qwen2.5 checkpoint) also loads, without text_tokenizer.json.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from megatron_xomni.file_checks import BadFile, read_json, require_dir, require_file

SOM, EOM, IMAGE = "<SOM>", "<EOM>", "<IMAGE>"
SPECIAL_TOKENS: tuple[str, str, str] = (SOM, EOM, IMAGE)
META_NAME = "text_tokenizer.json"
SPM_NAME = "spm.model"
EOS_PIECE = "</s>"
_MM_TOKEN_RE = re.compile(r"<MM-Token-(\d+)>")


def image_token_id(k: int, text_vocab_size: int) -> int:
    """Id of image code k in the model's token space (X-Omni: text_vocab + k)."""
    return text_vocab_size + int(k)


def mm_token_string(k: int) -> str:
    """The string X-Omni uses for image code k."""
    return f"<MM-Token-{int(k)}>"


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int = 512,
    byte_fallback: bool = True,
) -> Path:
    """Train a BPE sentencepiece model on `texts`; returns the path of `<out_prefix>.model`.

    Settings and why:
    - `<SOM>`, `<EOM>`, `<IMAGE>` are user-defined symbols: always one id (2, 3, 4), matched inside text.
    - split_digits + required digits: numbers are single-digit pieces, so a grid header "4 4" or "72 72"
      tokenizes as ordinary text, the same way Qwen's tokenizer splits digits.
    - no dummy prefix, identity normalisation, whitespace kept: encode is literal, so encoding segments
      separately and concatenating the ids decodes to the concatenated text (the sequence format relies on it).
    - byte_fallback: any UTF-8 text encodes (no `<unk>`), at the cost of 256 byte pieces in the vocabulary.
    - one thread, fixed seed-free BPE: the same texts give the same model bytes.
    `vocab_size` is an upper bound (hard_vocab_limit=False) because small corpora cannot fill large vocabularies.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    reserved = 2 + len(SPECIAL_TOKENS) + (256 if byte_fallback else 0)
    if vocab_size <= reserved + 10:
        raise ValueError(f"vocab_size={vocab_size} is too small: {reserved} ids are reserved (unk, eos, specials"
                         f"{', 256 bytes' if byte_fallback else ''}); use at least {reserved + 64}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=list(SPECIAL_TOKENS),
        split_digits=True,
        required_chars="0123456789",
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=byte_fallback,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        eos_piece=EOS_PIECE,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = out_prefix.with_name(out_prefix.name + ".model")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


class XOmniTextTokenizer:
    """Text tokenizer with X-Omni's three multimodal special tokens; see the module docstring."""

    def __init__(self, backend, kind: str):
        """Use `from_sentencepiece`, `from_hf` or `load`; `backend` is the wrapped tokenizer object."""
        self.kind = kind
        self._backend = backend
        if kind == "sentencepiece":
            self._vocab_size = int(backend.vocab_size())
            ids = [backend.piece_to_id(t) for t in SPECIAL_TOKENS]
            unk = backend.unk_id()
            if any(i == unk for i in ids):
                raise ValueError(f"sentencepiece model lacks {SPECIAL_TOKENS} as symbols; train it with train_sentencepiece")
            self._eos = int(backend.eos_id())
            if self._eos < 0:
                raise ValueError("sentencepiece model has no EOS piece; train it with train_sentencepiece")
        elif kind == "hf":
            missing = [t for t in SPECIAL_TOKENS if t not in backend.get_vocab()]
            if missing:
                backend.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            self._vocab_size = len(backend)
            ids = backend.convert_tokens_to_ids(list(SPECIAL_TOKENS))
            if backend.eos_token_id is None:
                raise ValueError("HF tokenizer has no eos_token; set eos_token in its tokenizer_config.json")
            self._eos = int(backend.eos_token_id)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'sentencepiece' or 'hf'")
        self.som_id, self.eom_id, self.image_id = (int(i) for i in ids)
        for tok, i in zip(SPECIAL_TOKENS, (self.som_id, self.eom_id, self.image_id)):
            if self.encode(tok) != [i]:
                raise ValueError(f"{tok} does not encode to the single id {i}; register it as a special token")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sentencepiece(cls, model_file: str | os.PathLike) -> "XOmniTextTokenizer":
        import sentencepiece as spm

        fix = "build one with python -m megatron_xomni.train tiny_text_tokenizer (or xomni_text_tokenizer)"
        path = require_file(model_file, "sentencepiece model", fix)
        try:
            proc = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except RuntimeError as e:  # sentencepiece's parse error for anything that is not a model proto
            raise BadFile(f"sentencepiece model {path} cannot be parsed ({str(e).strip().splitlines()[0]}): "
                          f"it is truncated or not a sentencepiece model; {fix}") from None
        return cls(proc, "sentencepiece")

    @classmethod
    def from_hf(cls, local_path: str | os.PathLike) -> "XOmniTextTokenizer":
        """A local HF tokenizer folder (e.g. Qwen2.5's); the special tokens are added if absent."""
        from transformers import AutoTokenizer

        path = Path(local_path)
        if not path.is_dir():
            raise ValueError(f"HF tokenizer folder {path} does not exist; download the model's tokenizer files there")
        return cls(AutoTokenizer.from_pretrained(str(path)), "hf")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "XOmniTextTokenizer":
        """A folder written by `save`, or a plain HF tokenizer folder."""
        directory = require_dir(directory, "text tokenizer folder", "pass a folder written by XOmniTextTokenizer.save")
        meta_path = directory / META_NAME
        if meta_path.exists():
            meta = read_json(meta_path, "text tokenizer metadata", "rewrite it with XOmniTextTokenizer.save",
                             required=("kind",))
            kind = meta.get("kind")
            if kind == "sentencepiece":
                tok = cls.from_sentencepiece(directory / meta.get("model_file", SPM_NAME))
            elif kind == "hf":
                tok = cls.from_hf(directory)
            else:
                raise ValueError(f"{meta_path}: unknown kind {kind!r}; rewrite it with XOmniTextTokenizer.save")
            if [tok.som_id, tok.eom_id, tok.image_id, tok.eos_id] != meta.get("special_ids", [tok.som_id, tok.eom_id, tok.image_id, tok.eos_id]):
                raise ValueError(f"{directory}: special token ids differ from the ones saved in {META_NAME}")
            return tok
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
            return cls.from_hf(directory)
        if (directory / SPM_NAME).is_file():
            return cls.from_sentencepiece(directory / SPM_NAME)
        raise ValueError(f"{directory} holds no text tokenizer ({META_NAME}, tokenizer.json or {SPM_NAME}); "
                         "build one with python -m megatron_xomni.train tiny_text_tokenizer (or xomni_text_tokenizer)")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the folder `load` reads; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "sentencepiece":
            tmp = directory / (SPM_NAME + ".tmp")
            tmp.write_bytes(self._backend.serialized_model_proto())
            os.replace(tmp, directory / SPM_NAME)
        else:
            self._backend.save_pretrained(str(directory))
        meta = {
            "kind": self.kind,
            "model_file": SPM_NAME if self.kind == "sentencepiece" else None,
            "special_tokens": list(SPECIAL_TOKENS),
            "special_ids": [self.som_id, self.eom_id, self.image_id, self.eos_id],
            "vocab_size": self.vocab_size,
        }
        tmp = directory / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, directory / META_NAME)
        return directory

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: [0, vocab_size). The model's text table may be larger (padding)."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        """End of document; the `eod` of megatron-core's datasets."""
        return self._eos

    @property
    def eod_id(self) -> int:
        return self._eos

    @property
    def special_ids(self) -> dict[str, int]:
        return {SOM: self.som_id, EOM: self.eom_id, IMAGE: self.image_id, "eos": self.eos_id}

    @staticmethod
    def image_token_id(k: int, text_vocab_size: int) -> int:
        return image_token_id(k, text_vocab_size)

    def check_text_vocab(self, text_vocab_size: int) -> None:
        """Raise unless a model text table of `text_vocab_size` rows holds every tokenizer id."""
        if int(text_vocab_size) < self.vocab_size:
            raise ValueError(
                f"model text_vocab_size={text_vocab_size} is smaller than the text tokenizer's vocabulary "
                f"({self.vocab_size} ids): image ids would collide with text ids; set model.text_vocab_size >= "
                f"{self.vocab_size} or train a smaller tokenizer")

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS/EOS added; special-token strings in the text become their single ids."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            return list(self._backend.encode(text))
        return list(self._backend.encode(text, add_special_tokens=False))

    def _decode_text(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            # sentencepiece renders user symbols (<SOM>...) literally but control symbols (</s>) as "":
            # keep those visible by emitting their piece between decoded runs
            sp, parts, run = self._backend, [], []
            for i in ids:
                if sp.is_control(i):
                    parts.append(sp.decode(run) + sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            return "".join(parts) + sp.decode(run)
        return self._backend.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def decode(self, ids: Sequence[int], text_vocab_size: int | None = None) -> str:
        """Ids -> text; ids >= text_vocab_size (default: the tokenizer's vocab size) render as `<MM-Token-k>`.

        EOS renders as the tokenizer's EOS string. Ids between the tokenizer's vocabulary and the model's
        text table size (padding rows) have no text and raise.
        """
        tv = self.vocab_size if text_vocab_size is None else int(text_vocab_size)
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)
            if i >= tv:
                if run:
                    out.append(self._decode_text(run))
                    run = []
                out.append(mm_token_string(i - tv))
            elif i < 0 or i >= self.vocab_size:
                raise ValueError(f"id {i} is outside the tokenizer vocabulary [0, {self.vocab_size}) and below "
                                 f"text_vocab_size={tv}: it is a padding row, not a token")
            else:
                run.append(i)
        if run:
            out.append(self._decode_text(run))
        return "".join(out)

    def parse_mm_token(self, piece: str) -> int | None:
        """`<MM-Token-k>` -> k, anything else -> None."""
        m = _MM_TOKEN_RE.fullmatch(piece)
        return int(m.group(1)) if m else None


def __getattr__(name: str):
    # world_texts lives with the world's other data adapters (data/world_source.py); the old import path
    # keeps working without this module importing the world
    if name == "world_texts":
        from megatron_xomni.data.world_source import world_texts

        return world_texts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
