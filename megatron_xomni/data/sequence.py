"""X-Omni token sequences: building training documents (ids + per-token loss mask) and parsing them back.

An image block is `<SOM>{h} {w}<IMAGE>` + h*w image ids in raster order + `<EOM>`, where h, w (the grid in
tokens) are written as ordinary text ("4 4") and image code k has id text_vocab_size + k.

Generation document (text -> image):

    caption  <SOM> h ␣ w <IMAGE>  c_0 ... c_{h*w-1}  <EOM>  EOS
    mask: 0 ... 0                  1 ...  1           1      0 (1 with supervise_eos_in_generation)

    Only the image codes and <EOM> are targets (X-Omni supervises image tokens of generation samples; <EOM>
    tells the model the image is done). The caption and the grid header are conditioning: at inference the
    caller writes `<SOM>{h} {w}<IMAGE>` itself to pick the resolution. EOS is not supervised by default:
    the sampler stops at <EOM>, so what follows it is never generated; it is still in the document so that
    megatron-core's packing sees document ends.

Understanding document (image -> text), one document per record holding all its question/answer turns:

    <SOM> h ␣ w <IMAGE> c_0 ... <EOM>  q_1 sep  a_1  turn_sep q_2 sep  a_2 ...  EOS
    mask: 0 ...                        0 ...    1 ...  0 ...           1 ...    1

    Only answer tokens and the final EOS are targets (X-Omni supervises text tokens of understanding
    samples; the question is the prompt). Records without question/answer pairs in their metadata become a
    captioning turn: (caption_question, caption).

The loss mask is per token ("is this token a training target"), the convention of
megatron_xomni.data.token_files. Text segments are encoded separately and concatenated, which the
tokenizers support (literal sentencepiece encoding; Qwen's byte-level BPE).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_xomni.data.text_tokenizer import SPECIAL_TOKENS, XOmniTextTokenizer

_GRID_RE = re.compile(r"(\d+) (\d+)")


class FormatError(ValueError):
    """A record that cannot become a document, or ids that are not a valid X-Omni sequence."""


@dataclass(frozen=True)
class SequenceFormat:
    """Token-space sizes and the text conventions of training documents."""

    text_vocab_size: int
    """Rows of the model's text table; image code k has id text_vocab_size + k."""
    image_vocab_size: int
    """Number of image codes (the tokenizer's codebook size)."""
    qa_separator: str = " "
    """Text between a question and its answer (part of the prompt, not supervised)."""
    turn_separator: str = "\n"
    """Text before the second and later questions of an understanding document (not supervised)."""
    caption_question: str = "Describe the image."
    """Question of the captioning turn used for records whose metadata has no "qa" list."""
    supervise_eos_in_generation: bool = False
    """Also train generation documents to predict EOS after <EOM> (the sampler stops at <EOM>)."""
    max_qa_turns: int | None = None
    """Keep at most this many question/answer turns per understanding document (None: all)."""

    def __post_init__(self) -> None:
        if self.text_vocab_size <= 0 or self.image_vocab_size <= 0:
            raise ValueError(f"text_vocab_size ({self.text_vocab_size}) and image_vocab_size "
                             f"({self.image_vocab_size}) must be > 0")
        if self.max_qa_turns is not None and self.max_qa_turns <= 0:
            raise ValueError(f"max_qa_turns must be None or > 0, got {self.max_qa_turns}")


@dataclass
class Document:
    """One training document: token ids (int32) and per-token loss mask (uint8), equal length."""

    ids: np.ndarray
    mask: np.ndarray


@dataclass
class ParsedImage:
    """An image block read back from a sequence."""

    text: str
    """Decoded text before <SOM> (the prompt)."""
    height: int
    """Grid rows h."""
    width: int
    """Grid columns w."""
    codes: np.ndarray
    """Image codes [h, w] (int64), raster order, in [0, image_vocab_size)."""
    rest: list[int]
    """Ids after <EOM> (e.g. EOS, or text of an understanding answer)."""


class _Builder:
    """Accumulates (ids, mask) segments."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[int] = []

    def add(self, ids: Sequence[int], target: bool) -> None:
        self.ids.extend(int(i) for i in ids)
        self.mask.extend([int(target)] * len(ids))

    def done(self) -> Document:
        return Document(np.asarray(self.ids, dtype=np.int32), np.asarray(self.mask, dtype=np.uint8))


def _encode_text(tok: XOmniTextTokenizer, text: str, what: str) -> list[int]:
    """Encode free text, refusing the multimodal special strings (they would forge an image block)."""
    for special in SPECIAL_TOKENS:
        if special in text:
            raise FormatError(f"{what} contains the reserved token {special!r}; remove it from the text")
    return tok.encode(text)


def _check_codes(codes, fmt: SequenceFormat) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.shape[0] <= 0 or arr.shape[1] <= 0:
        raise FormatError(f"image codes must be a non-empty [h, w] grid, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise FormatError(f"image codes must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= fmt.image_vocab_size:
        raise FormatError(f"image codes must lie in [0, {fmt.image_vocab_size}), got range "
                          f"[{arr.min()}, {arr.max()}]; does image_vocab_size match the image tokenizer?")
    return arr.astype(np.int64)


def image_block_ids(tok: XOmniTextTokenizer, fmt: SequenceFormat, codes) -> tuple[list[int], list[int], int]:
    """(header ids `<SOM>h w<IMAGE>`, image ids in raster order, <EOM> id) for a [h, w] code grid."""
    arr = _check_codes(codes, fmt)
    h, w = arr.shape
    header = [tok.som_id] + tok.encode(f"{h} {w}") + [tok.image_id]
    return header, (arr.reshape(-1) + fmt.text_vocab_size).tolist(), tok.eom_id


def build_generation(tok: XOmniTextTokenizer, fmt: SequenceFormat, caption: str, codes) -> Document:
    """`caption <SOM>h w<IMAGE> codes <EOM> EOS`; targets: codes and <EOM> (see the module docstring)."""
    tok.check_text_vocab(fmt.text_vocab_size)
    if not caption or not caption.strip():
        raise FormatError("generation documents need a non-empty caption")
    header, image, eom = image_block_ids(tok, fmt, codes)
    b = _Builder()
    b.add(_encode_text(tok, caption, "caption"), False)
    b.add(header, False)
    b.add(image, True)
    b.add([eom], True)
    b.add([tok.eos_id], fmt.supervise_eos_in_generation)
    return b.done()


def qa_turns(meta: dict, caption: str, fmt: SequenceFormat) -> list[tuple[str, str]]:
    """Question/answer turns of a record: meta["qa"] ([[q, a], ...]) or the captioning turn."""
    qa = meta.get("qa") if isinstance(meta, dict) else None
    if qa:
        try:
            turns = [(str(q), str(a)) for q, a in qa]
        except (TypeError, ValueError):
            raise FormatError(f"meta['qa'] must be a list of [question, answer] pairs, got {qa!r:.80}") from None
    else:
        turns = [(fmt.caption_question, caption)]
    return turns[: fmt.max_qa_turns] if fmt.max_qa_turns else turns


def build_understanding(tok: XOmniTextTokenizer, fmt: SequenceFormat, codes, turns: Sequence[tuple[str, str]]) -> Document:
    """`<SOM>h w<IMAGE> codes <EOM> q1 sep a1 [turn_sep q2 sep a2 ...] EOS`; targets: answers and EOS."""
    tok.check_text_vocab(fmt.text_vocab_size)
    if not turns:
        raise FormatError("understanding documents need at least one (question, answer) turn")
    header, image, eom = image_block_ids(tok, fmt, codes)
    b = _Builder()
    b.add(header, False)
    b.add(image, False)
    b.add([eom], False)
    for n, (question, answer) in enumerate(turns):
        if not answer.strip():
            raise FormatError(f"turn {n} has an empty answer; drop it from meta['qa']")
        prompt = (fmt.turn_separator if n else "") + question + fmt.qa_separator
        b.add(_encode_text(tok, prompt, f"question {n}"), False)
        b.add(_encode_text(tok, answer, f"answer {n}"), True)
    b.add([tok.eos_id], True)
    return b.done()


def parse_image_sequence(
    tok: XOmniTextTokenizer, fmt: SequenceFormat, ids: Sequence[int], require_eom: bool = True
) -> ParsedImage:
    """Split a (generated) sequence `text <SOM>h w<IMAGE> codes <EOM> rest` into its parts.

    Raises FormatError naming what is wrong: no <SOM>, no <IMAGE>, a header that is not "h w", fewer than
    h*w image ids, a text id among the image ids, or (require_eom) no <EOM> right after the codes.
    """
    seq = [int(i) for i in ids]
    tv, iv = fmt.text_vocab_size, fmt.image_vocab_size
    try:
        som = seq.index(tok.som_id)
    except ValueError:
        raise FormatError("sequence has no <SOM>: it holds no image") from None
    try:
        img = seq.index(tok.image_id, som + 1)
    except ValueError:
        raise FormatError("sequence has <SOM> but no <IMAGE> after it: the grid header is unfinished") from None
    header_ids = seq[som + 1 : img]
    if any(i >= tv for i in header_ids):
        raise FormatError("image ids appear inside the grid header, before <IMAGE>")
    header = tok.decode(header_ids, tv)
    m = _GRID_RE.fullmatch(header)
    if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise FormatError(f"grid header {header!r} between <SOM> and <IMAGE> is not 'h w' with positive integers")
    h, w = int(m.group(1)), int(m.group(2))
    body = seq[img + 1 : img + 1 + h * w]
    if len(body) < h * w:
        raise FormatError(f"sequence ends after {len(body)} of the {h}x{w}={h * w} image tokens")
    bad = [(n, i) for n, i in enumerate(body) if not tv <= i < tv + iv]
    if bad:
        n, i = bad[0]
        raise FormatError(f"image token {n} of {h * w} has id {i}, outside the image range [{tv}, {tv + iv})")
    after = img + 1 + h * w
    rest = seq[after:]
    if rest and rest[0] == tok.eom_id:
        rest = rest[1:]
    elif require_eom:
        found = "the sequence ends" if not rest else f"id {rest[0]} follows"
        raise FormatError(f"expected <EOM> after the {h * w} image tokens but {found}")
    codes = np.asarray(body, dtype=np.int64).reshape(h, w) - tv
    text = tok.decode(seq[:som], tv)
    return ParsedImage(text=text, height=h, width=w, codes=codes, rest=rest)
