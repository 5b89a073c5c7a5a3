"""Offline tokenization: WebDataset corpus -> megatron-core token files (ids + loss masks) for the AR model.

Work split and outputs. The unit of work is one corpus shard. Worker processes (spawned, each holding the
frozen image tokenizer) take shards from a pool; shard i writes its own part files

    <out_prefix>.parts/<mode>-<i:06d>.bin/.idx (+ _lossmask)   written through TokenFileWriter (tmp + rename)
    <out_prefix>.parts/done-<i:06d>.json                         completion marker, written after the parts

and when every shard is done the parts are concatenated in shard order (megatron-core's
IndexedDatasetBuilder.add_index, a byte copy) into the final files

    <out_prefix>_generation.bin/.idx/_lossmask.*      (mode generation or both)
    <out_prefix>_understanding.bin/.idx/_lossmask.*   (mode understanding or both)
    <out_prefix>.json                                 summary: blend prefixes, counts, merged skip report

The summary is written last, so its presence means the run is complete; then the parts folder is deleted.
Generation and understanding go to separate prefixes so the training blend weighs them (PT-1 uses
generation only). Each image is encoded once for both.

Determinism: a shard's documents depend only on the shard (its records in order, fixed batching inside the
shard, a fixed torch thread count per worker), and the merge order is the shard order, so the final files
are byte-identical for any worker count. Resume: a run keeps the parts whose marker exists and redoes the
others (a part without marker, e.g. from a killed worker, is overwritten); the run's settings are
fingerprinted in the parts folder (and in the summary) so a resume with other inputs is refused.

<out_prefix> is <save_dir>/<prefix> of a TokenizeRunConfig (the stage's run config, recipes `tiny_tokenize`
and `xomni_tokenize`: `python -m megatron_xomni.train tiny_tokenize corpus=... save_dir=...`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from megatron_xomni.device import torch_threads
from megatron_xomni.data.sequence import FormatError, SequenceFormat, build_generation, build_understanding, qa_turns
from megatron_xomni.training import faults
from megatron_xomni.training.run import EXIT_OK, RunSection

MODES = ("generation", "understanding")
# what a worker imports; preloaded once by the forkserver
_WORKER_MODULES = ("torch", "megatron.core.datasets.indexed_dataset", "megatron_xomni.data.token_files",
                   "megatron_xomni.data", "megatron_xomni.data.text_tokenizer", "megatron_xomni.models.siglip_vq",
                   "megatron_xomni.inference.tokenize_corpus")
PARTS_SUFFIX = ".parts"
FINGERPRINT_NAME = "run.json"


@dataclass
class TokenizeRunConfig(RunSection):
    """One offline tokenization run: `python -m megatron_xomni.train tiny_tokenize corpus=... save_dir=...`.

    How the run section maps: `save_dir` is the output folder (files `<save_dir>/<prefix>_<mode>.*` and
    `<save_dir>/<prefix>.json`); a run always continues from its completed shards there (the unit of work
    and of resume is a corpus shard; a finished output is returned as is); `seed` seeds a preset image
    tokenizer's random init; `debug_kill=after_step:N` SIGKILLs the run after the N-th shard it
    publishes, `in_save:N` in the middle of the final merge (N = the number of shards). `steps`,
    `save_interval`, `keep_last` and `log_interval` do not apply: tokenization is not iterative.
    One process, which starts `workers` worker processes itself (DISTRIBUTED = False: no torchrun).
    """

    RUNNER: ClassVar[str] = "megatron_xomni.inference.tokenize_corpus:run_tokenize"
    DISTRIBUTED: ClassVar[bool] = False
    RENAMED_FIELDS: ClassVar[dict] = {"out_prefix": "save_dir", "init_seed": "seed", "quiet": "progress"}

    name: str = "tokenize"
    save_dir: str = "runs/tokens"
    corpus: str = ""
    """Corpus directory written by megatron_xomni.data (index.json + shard-*.tar)."""
    text_tokenizer: str = ""
    """Folder of the text tokenizer (the text-tokenizer stage's save_dir, or a local HF tokenizer folder)."""
    image_tokenizer: str = ""
    """SiglipVQTokenizer checkpoint folder (the SigLIP-VQ stage's <save_dir>/export/tokenizer), or a preset
    name ("tiny", "xomni") for a randomly initialised tokenizer seeded with `seed` (tests, smoke runs)."""
    prefix: str = "tokens"
    """File name stem of the outputs inside save_dir."""
    mode: str = "both"
    """generation | understanding | both."""
    workers: int = 1
    """Worker processes; 1 runs in this process."""
    text_vocab_size: Optional[int] = None
    """Model text table size (image code k -> id text_vocab_size + k). Must equal model.text_vocab_size
    (Qwen2.5: 152064; tiny preset: 512). None: the tokenizer's vocabulary rounded up to a multiple of 128."""
    preprocess: Optional[str] = None
    """Image preprocessing rules: "tiny" or "xomni" (ImagePreprocessConfig); None: "tiny" for the tiny
    image tokenizer preset, else "xomni"."""
    device: str = "cpu"
    """Where the image tokenizer runs; "cuda" spreads workers over the visible GPUs."""
    batch_size: int = 16
    """Images per encode call (consecutive same-size images of one shard)."""
    threads_per_worker: int = 1
    """torch CPU threads per worker (fixed so results do not depend on the machine's core count)."""
    decoder: str = "pillow"
    """Image decoder of the corpus reader (pillow | dali | auto)."""
    progress: bool = True
    """Show a tqdm progress bar and the final report."""
    format: dict = field(default_factory=dict)
    """Extra SequenceFormat fields (qa_separator, caption_question, supervise_eos_in_generation, ...)."""

    @property
    def out_prefix(self) -> str:
        return str(Path(self.save_dir) / self.prefix)

    def modes(self) -> tuple[str, ...]:
        if self.mode == "both":
            return MODES
        if self.mode in MODES:
            return (self.mode,)
        raise ValueError(f"mode must be generation, understanding or both, got {self.mode!r}")

    def validate(self, world_size: int = 1) -> None:
        """One-line ValueError (types and values only; no paths)."""
        from megatron_xomni.dataclass_utils import check_numbers

        self.validate_run()
        if world_size > 1:
            raise ValueError("tokenization is one process that starts its own workers: run it without torchrun "
                             "(python -m megatron_xomni.train RECIPE ...) and set workers=N")
        self.modes()
        check_numbers({"workers": self.workers, "batch_size": self.batch_size,
                       "threads_per_worker": self.threads_per_worker}, 1)
        check_numbers({"text_vocab_size": self.text_vocab_size}, 1, optional=True)
        for name in ("corpus", "text_tokenizer", "image_tokenizer", "prefix"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} is empty: set {name}=...")
        if "/" in self.prefix:
            raise ValueError(f"prefix={self.prefix!r} is a file name stem inside save_dir: drop the folder part")
        if self.preprocess not in (None, "tiny", "xomni"):
            raise ValueError(f"preprocess must be 'tiny' or 'xomni', got {self.preprocess!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: use cpu or cuda")
        if not isinstance(self.format, dict):
            raise ValueError("format must be a JSON object of SequenceFormat fields")

    def check_paths(self) -> None:
        from megatron_xomni.training.run import InputError

        if not (Path(self.corpus) / "index.json").is_file():
            raise InputError(f"corpus={self.corpus} is not a corpus folder (no index.json): build one with "
                             "xomni corpus, or fix the path")
        if not Path(self.text_tokenizer).is_dir():
            raise InputError(f"text_tokenizer={self.text_tokenizer} is not a folder: train the text tokenizer "
                             "first (python -m megatron_xomni.train tiny_text_tokenizer)")
        if not Path(self.image_tokenizer).is_dir() and self.image_tokenizer not in ("tiny", "xomni"):
            raise InputError(f"image_tokenizer={self.image_tokenizer} is neither a folder nor a preset name "
                             "('tiny', 'xomni'): train the SigLIP-VQ tokenizer first and pass its export/tokenizer")


def output_prefix(out_prefix: str | os.PathLike, mode: str) -> str:
    """Token file prefix of one mode (what goes into DataConfig.blend)."""
    return f"{out_prefix}_{mode}"


def summary_path(out_prefix: str | os.PathLike) -> Path:
    return Path(f"{out_prefix}.json")


# ---------------------------------------------------------------------------------------------- loading
def load_image_tokenizer(spec: str, device: str = "cpu", init_seed: int = 0):
    """A frozen SiglipVQTokenizer from a checkpoint folder, or a preset name with seeded random init."""
    import torch

    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    if Path(spec).is_dir():
        tok = SiglipVQTokenizer.from_pretrained(spec, device=device)
    else:
        try:
            cfg = tokenizer_config(spec)
        except ValueError:
            raise ValueError(f"image tokenizer {spec!r} is neither a checkpoint folder nor a preset name "
                             "('tiny', 'xomni')") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            tok = SiglipVQTokenizer(cfg)
        tok = tok.to(device)
    tok.eval().requires_grad_(False)
    return tok


def _preprocess_config(cfg: TokenizeRunConfig, patch_size: int):
    from megatron_xomni.data import ImagePreprocessConfig

    name = cfg.preprocess or ("tiny" if cfg.image_tokenizer == "tiny" else "xomni")
    if name == "tiny":
        pp = ImagePreprocessConfig.tiny()
    elif name == "xomni":
        pp = ImagePreprocessConfig()
    else:
        raise ValueError(f"preprocess must be 'tiny' or 'xomni', got {name!r}")
    if pp.multiple % patch_size:  # a coarser rounding is fine (16 px sizes also suit the decoder's fold)
        raise ValueError(f"preprocess rounds to multiples of {pp.multiple}, not a multiple of the image tokenizer's "
                         f"patch {patch_size}; pick matching presets")
    return pp


def _file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- workers
class _ShardWorker:
    """Everything one process needs to tokenize shards (built once per process)."""

    def __init__(self, cfg: TokenizeRunConfig, fmt: SequenceFormat, device: str):
        from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer

        self.cfg, self.fmt, self.device = cfg, fmt, device
        self.text = XOmniTextTokenizer.load(cfg.text_tokenizer)
        self.image = load_image_tokenizer(cfg.image_tokenizer, device, cfg.seed)
        self.pp = _preprocess_config(cfg, self.image.cfg.patch_size)
        self.parts = Path(f"{cfg.out_prefix}{PARTS_SUFFIX}")

    def _encode(self, batch: list[dict]) -> list[np.ndarray]:
        import torch

        pixels = torch.stack([s["pixels"] for s in batch]).to(self.device)
        codes = self.image.encode(pixels)
        return [c for c in codes.cpu().numpy()]

    def run(self, shard_idx: int, num_shards: int) -> dict:
        """Tokenize shard `shard_idx`; publishes its parts, then its marker; returns the marker."""
        from megatron_xomni.data import CorpusReader
        from megatron_xomni.data.token_files import TokenFileWriter

        cfg, fmt = self.cfg, self.fmt
        reader = CorpusReader(cfg.corpus, self.pp, decoder=cfg.decoder)
        modes = cfg.modes()
        writers = {m: TokenFileWriter(self.parts / f"{m}-{shard_idx:06d}") for m in modes}
        stats = {m: {"documents": 0, "tokens": 0, "target_tokens": 0, "format_errors": 0, "format_error_examples": []}
                 for m in modes}

        def emit(batch: list[dict]) -> None:
            for sample, codes in zip(batch, self._encode(batch)):
                for m in modes:
                    try:
                        if m == "generation":
                            doc = build_generation(self.text, fmt, sample["caption"], codes)
                        else:
                            doc = build_understanding(self.text, fmt, codes, qa_turns(sample["meta"], sample["caption"], fmt))
                    except FormatError as exc:
                        st = stats[m]
                        st["format_errors"] += 1
                        if len(st["format_error_examples"]) < 5:
                            st["format_error_examples"].append([f"{sample['shard']}/{sample['key']}", str(exc)[:200]])
                        continue
                    writers[m].add_document(doc.ids, doc.mask)
                    stats[m]["documents"] += 1
                    stats[m]["tokens"] += int(doc.ids.size)
                    stats[m]["target_tokens"] += int(doc.mask.sum())

        batch: list[dict] = []
        # split_by="shard" with one consumer per shard: consumer i reads exactly shard i (and the manifest's
        # record count, so records lost to a truncated shard are reported)
        for sample in reader.iter_samples(consumer=shard_idx, num_consumers=num_shards, split_by="shard"):
            if batch and (len(batch) == cfg.batch_size or sample["pixels"].shape != batch[0]["pixels"].shape):
                emit(batch)
                batch = []
            batch.append(sample)
        if batch:
            emit(batch)
        for w in writers.values():
            w.finalize()
        marker = {"shard": shard_idx, "name": reader.shards[shard_idx].name, "modes": stats,
                  "report": reader.report.to_dict()}
        _write_json(self.parts / f"done-{shard_idx:06d}.json", marker)
        return marker


_WORKER: _ShardWorker | None = None


def _init_worker(cfg_dict: dict, fmt_dict: dict, device_queue) -> None:
    global _WORKER
    import torch

    cfg = TokenizeRunConfig(**cfg_dict)
    torch.set_num_threads(cfg.threads_per_worker)
    slot = device_queue.get()
    device = cfg.device
    if device == "cuda":
        device = f"cuda:{slot % max(1, torch.cuda.device_count())}"
    _WORKER = _ShardWorker(cfg, SequenceFormat(**fmt_dict), device)


def _run_in_worker(shard_idx: int, num_shards: int) -> dict:
    assert _WORKER is not None, "worker was not initialised"
    return tokenize_shard(_WORKER, shard_idx, num_shards)


def tokenize_shard(worker: _ShardWorker, shard_idx: int, num_shards: int) -> dict:
    """One unit of work (module-level so tests can interrupt a run here)."""
    return worker.run(shard_idx, num_shards)


# ---------------------------------------------------------------------------------------------- driver
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fingerprint(cfg: TokenizeRunConfig, fmt: SequenceFormat, text_tok, shard_names: list[str]) -> dict:
    """What the parts depend on; a resume must match it exactly."""
    text_files = [p for p in Path(cfg.text_tokenizer).iterdir() if p.is_file() and not p.name.endswith(".tmp")]
    img = Path(cfg.image_tokenizer)
    image_id = ({"checkpoint": _file_digest([p for p in img.iterdir() if p.is_file()])} if img.is_dir()
                else {"preset": cfg.image_tokenizer, "init_seed": cfg.seed})
    return {
        "corpus_shards": shard_names,
        "modes": list(cfg.modes()),
        "format": asdict(fmt),
        "text_tokenizer": {"digest": _file_digest(text_files), "special_ids": text_tok.special_ids,
                           "vocab_size": text_tok.vocab_size},
        "image_tokenizer": image_id,
        "preprocess": cfg.preprocess or ("tiny" if cfg.image_tokenizer == "tiny" else "xomni"),
        "batch_size": cfg.batch_size,
        "threads_per_worker": cfg.threads_per_worker,
    }


def _format_for(cfg: TokenizeRunConfig, text_tok, image_vocab_size: int) -> SequenceFormat:
    tv = cfg.text_vocab_size
    if tv is None:
        tv = -(-text_tok.vocab_size // 128) * 128
    fmt = SequenceFormat(text_vocab_size=int(tv), image_vocab_size=int(image_vocab_size), **cfg.format)
    text_tok.check_text_vocab(fmt.text_vocab_size)
    return fmt


def _image_vocab_size(spec: str) -> int:
    from megatron_xomni.models.siglip_vq import SigLIPVQConfig, tokenizer_config

    p = Path(spec)
    if p.is_dir():
        return SigLIPVQConfig.load(p / "config.json").codebook_size
    return tokenizer_config(spec).codebook_size


def tokenize_corpus(cfg: TokenizeRunConfig) -> dict:
    """Run (or resume) the whole pipeline; returns the summary written to <out_prefix>.json."""
    from megatron_xomni.data import CorpusReader, SkipReport
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer

    cfg.validate()
    modes = cfg.modes()
    final_summary = summary_path(cfg.out_prefix)
    parts = Path(f"{cfg.out_prefix}{PARTS_SUFFIX}")
    text_tok = XOmniTextTokenizer.load(cfg.text_tokenizer)
    fmt = _format_for(cfg, text_tok, _image_vocab_size(cfg.image_tokenizer))
    reader = CorpusReader(cfg.corpus)
    names = [s.name for s in reader.shards]
    num_shards = len(names)
    if num_shards == 0:
        raise ValueError(f"corpus {cfg.corpus} has no shards")
    total_records = sum(c or 0 for c in reader.expected_counts)

    # the run continues from what save_dir holds, provided it was made from the same inputs and settings
    fingerprint = json.loads(json.dumps(_fingerprint(cfg, fmt, text_tok, names), sort_keys=True))
    if final_summary.is_file():
        done = json.loads(final_summary.read_text())
        if done.get("fingerprint") != fingerprint:
            raise ValueError(f"{final_summary} is a finished tokenization of other inputs or settings: pick another "
                             "save_dir (or prefix), or delete it")
        return done
    parts.mkdir(parents=True, exist_ok=True)
    fp_path = parts / FINGERPRINT_NAME
    if fp_path.is_file():
        if json.loads(fp_path.read_text()) != fingerprint:
            raise ValueError(f"{parts} was started with other inputs or settings; delete it to start over, or "
                             "pick another save_dir")
    else:
        _write_json(fp_path, fingerprint)

    markers: dict[int, dict] = {}
    for i in range(num_shards):
        m = parts / f"done-{i:06d}.json"
        if m.is_file():
            markers[i] = json.loads(m.read_text())
    todo = [i for i in range(num_shards) if i not in markers]

    from tqdm import tqdm

    done_records = sum((reader.expected_counts[i] or 0) for i in markers)
    bar = tqdm(total=total_records or None, initial=done_records, unit="rec", desc="tokenize",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        if todo and cfg.workers == 1:
            worker = _ShardWorker(cfg, fmt, "cuda:0" if cfg.device == "cuda" else cfg.device)
            with torch_threads(cfg.threads_per_worker):
                for n, i in enumerate(todo, 1):
                    markers[i] = tokenize_shard(worker, i, num_shards)
                    bar.update(reader.expected_counts[i] or 0)
                    faults.fire("after_step", n, cfg.debug_kill)
        elif todo:
            _run_pool(cfg, fmt, todo, num_shards, markers, bar, reader.expected_counts)
    finally:
        bar.close()

    summary = _merge(cfg, fmt, modes, parts, num_shards, markers, text_tok, fingerprint)
    report = SkipReport.from_dict(summary["skip_report"])
    if cfg.progress:
        print(f"tokenized {cfg.corpus} -> {cfg.out_prefix}: " + ", ".join(
            f"{m} {summary['modes'][m]['documents']} docs / {summary['modes'][m]['tokens']} tokens" for m in modes))
        print(str(report))
    return summary


def _run_pool(cfg, fmt, todo, num_shards, markers, bar, expected_counts) -> None:
    import multiprocessing as mp

    # forkserver, not fork: forking a process whose torch thread pools are running can deadlock. The server
    # imports the heavy modules once and every worker forks from it, so N workers cost one import, not N.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_WORKER_MODULES))
    slots = ctx.Queue()
    for s in range(cfg.workers):
        slots.put(s)
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(asdict(cfg), asdict(fmt), slots)) as pool:
        futures = {pool.submit(_run_in_worker, i, num_shards): i for i in todo}
        pending = set(futures)
        try:
            published = 0
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = futures[fut]
                    markers[i] = fut.result()  # re-raises a worker's error; finished shards keep their markers
                    bar.update(expected_counts[i] or 0)
                    published += 1
                    faults.fire("after_step", published, cfg.debug_kill)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _merge(cfg, fmt, modes, parts: Path, num_shards: int, markers: dict[int, dict], text_tok, fingerprint) -> dict:
    """Concatenate the parts in shard order into the final files, write the summary, drop the parts."""
    from megatron_xomni.data import SkipReport
    from megatron_xomni.data.token_files import TokenFileWriter

    report = SkipReport()
    totals = {m: {"documents": 0, "tokens": 0, "target_tokens": 0, "format_errors": 0, "format_error_examples": []}
              for m in modes}
    for i in range(num_shards):
        report.merge(SkipReport.from_dict(markers[i]["report"]))
        for m in modes:
            st = markers[i]["modes"][m]
            for k in ("documents", "tokens", "target_tokens", "format_errors"):
                totals[m][k] += st[k]
            ex = totals[m]["format_error_examples"]
            ex.extend(st["format_error_examples"][: max(0, 5 - len(ex))])
    for m in modes:
        if totals[m]["documents"] == 0:
            raise ValueError(f"no {m} documents were produced from {cfg.corpus} (see the skip report in "
                             f"{parts}/done-*.json); check the corpus and the preprocessing preset")
    # add_index runs gc.collect() per part, which walks every object of the (torch/transformers-sized)
    # heap: ~1 s a call. Freezing the heap first leaves those collections almost nothing to scan.
    gc.freeze()
    try:
        for m in modes:
            writer = TokenFileWriter(output_prefix(cfg.out_prefix, m))
            for i in range(num_shards):
                part = str(parts / f"{m}-{i:06d}")
                # byte copy of the part's .bin and its index appended to ours (same dtypes as TokenFileWriter)
                writer.tokens.add_index(part)
                writer.mask.add_index(part + "_lossmask")
                writer.documents += markers[i]["modes"][m]["documents"]
            writer.finalize()
            faults.fire("in_save", num_shards, cfg.debug_kill)  # a final file written, no summary yet
    finally:
        gc.unfreeze()
    summary = {
        "corpus": str(cfg.corpus),
        "blend": {m: output_prefix(cfg.out_prefix, m) for m in modes},
        "modes": totals,
        "eod_id": text_tok.eos_id,
        "special_ids": text_tok.special_ids,
        "text_vocab_size": fmt.text_vocab_size,
        "image_vocab_size": fmt.image_vocab_size,
        "format": asdict(fmt),
        "num_shards": num_shards,
        "skip_report": report.to_dict(),
        "fingerprint": fingerprint,
    }
    _write_json(summary_path(cfg.out_prefix), summary)
    shutil.rmtree(parts)
    return summary


def run_tokenize(cfg: TokenizeRunConfig) -> int:
    """The stage's RUNNER (python -m megatron_xomni.train RECIPE): checks, tokenizes, prints the blend."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    cfg.check_paths()
    summary = tokenize_corpus(cfg)
    Path(cfg.save_dir, "run_config.json").write_text(cfg.to_json())
    if cfg.progress:
        print("blend:", " ".join(summary["blend"].values()), f"(eod_id {summary['eod_id']}, "
              f"text_vocab_size {summary['text_vocab_size']})", flush=True)
    return EXIT_OK
