"""Every recipe in the registry saves, is SIGKILLed at a seeded step, resumes, and ends bit-identical
to an uninterrupted run: losses, final weights and optimizer state.

Each recipe keeps its own optimizer (distributed or not), freezing (`trainable`), schedule style,
sequence parallelism and dtype policy (bf16 mixed precision runs on CPU too). What is shrunk, and why:

| recipe setting                 | in the test                                   | why                                    |
|--------------------------------|-----------------------------------------------|----------------------------------------|
| model (7B, 28+4+4 layers)      | `model_preset("tiny")` (2+1+1 layers, h 64)   | CPU                                    |
| TP 4                           | TP 2 (SP kept)                                | the tiny model has 2 KV groups         |
| CP 2                           | CP 1                                          | CP needs Transformer Engine attention  |
| DP = world / (TP*CP)           | world 4 for TP>1 recipes (DP 2), else 2 (DP 2) | 2 CPU cores                            |
| steps, warmup, WSD decay       | 6 steps, warmup 1, WSD decay 3 (if > 0)       | keep the schedule's shape in 6 steps   |
| data (16K tokens, 256 x batch) | synthetic tokens, seq 64, global batch 8      | CPU                                    |
| init_from (converted Qwen/PT)  | a random tiny checkpoint                      | no real weights here                   |

GRPO recipes run on a tiny random bundle (SFT checkpoint, tokenizers, decoder) built here, for 4
steps instead of 6.

SigLIP-VQ recipes (DCP checkpoints of tokenizer + projector + AdamW) keep their teacher source, projector,
schedule style, re-seeding rule and eval sets:

| recipe setting                       | in the test                                     | why                          |
|--------------------------------------|-------------------------------------------------|------------------------------|
| tokenizer preset xomni (SigLIP2-g)   | tiny preset, still loaded from a local SigLIP   | CPU                          |
|   from `tokenizer.siglip_path`       |   checkpoint (transformers, 4x4 grid resized)   |                              |
| teacher Qwen2.5-1.5B (converted)     | the random tiny init checkpoint (dist-ckpt)     | no real weights here         |
| teacher warm-up (tiny: 300 steps)    | 2 steps                                         | CPU                          |
| X-Omni image sizes, 256 images/step  | 64 px world corpus, tiny rules, 4 images/step   | CPU                          |
| re-seeding every 50/200 steps        | every 3 steps (one re-seed each side of a kill) | exercise per-rank usage state |

The SigLIP contrastive recipe (DCP of ViT + text tower + scale/bias + AdamW) keeps its model and schedule
style; its global batch of 128 images becomes 8 over 2 ranks (the loss spans both ranks' rows).

Tokenization and the text tokenizer are not iterative (DISTRIBUTED = False: one process): their check is
"SIGKILL at a seeded fault point, rerun, get byte-identical outputs". Tokenization is killed after its
k-th published shard (`after_step:k`) or in the final merge (`in_save`); the rerun redoes only the
missing shards. The text tokenizer is killed after writing its folder but before publishing it
(`in_save:1`); the rerun rebuilds it and must produce the same bytes. X-Omni's tokenization (8 GPU
workers, Qwen2.5 tokenizer, trained SigLIP-VQ) runs with 2 CPU workers on the tiny tokenizers; X-Omni's
text tokenizer (a local Qwen2.5 tokenizer folder) reads a small byte-level BPE HF folder built here. One extra case runs PT-1 (frozen LM, distributed optimizer) with interleaved
pipeline stages (PP 2 x VPP 2, DP 2), the layout no recipe ships but users set on the command line.
A recipe of a config type this file does not know fails, so new stages must join the matrix.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest
import torch

from megatron_xomni.recipes import available_recipes, load_recipe
from tests.multirank import run_ranks
from tests.training.checkpoints import assert_same_state, plain_state

STEPS = {"ARRunConfig": 6, "GRPORunConfig": 4, "SiglipVQRunConfig": 6, "DecoderRunConfig": 4,
         "SiglipContrastiveRunConfig": 6}
VPP = ["parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.pipeline_parallel=2",
       "parallel.virtual_pipeline_parallel=2"]


def _cases() -> list:
    return [pytest.param(n, [], id=n) for n in available_recipes()] + [pytest.param("xomni_7b_pt1", VPP, id="xomni_7b_pt1-vpp")]


def _shrunk(name: str, root: Path, save_dir: Path, extra: list, kill: str = ""):
    """(config, world size) of recipe `name` mapped onto this machine (see the table above)."""
    from megatron_xomni.dataclass_utils import apply_overrides
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.rl.trainer import GRPORunConfig
    from megatron_xomni.training.config import ARRunConfig
    from megatron_xomni.training.flux_decoder import DecoderRunConfig
    from megatron_xomni.training.siglip_contrastive import SiglipContrastiveRunConfig
    from megatron_xomni.training.siglip_vq_config import SiglipVQRunConfig

    cfg = load_recipe(name)
    if not cfg.DISTRIBUTED:
        return _shrunk_one_process(cfg, root, save_dir, kill), 1
    if isinstance(cfg, SiglipVQRunConfig):
        return _shrunk_siglip_vq(cfg, root, save_dir, kill), 2
    if isinstance(cfg, DecoderRunConfig):
        return _shrunk_decoder(cfg, save_dir, kill), 2
    if isinstance(cfg, SiglipContrastiveRunConfig):
        return _shrunk_contrastive(cfg, root, save_dir, kill), 2
    cfg.model = model_preset("tiny")
    apply_overrides(cfg, extra)
    p = cfg.parallel
    p.tensor_parallel = min(p.tensor_parallel, 2)
    p.context_parallel = 1
    p.sequence_parallel = p.sequence_parallel and p.tensor_parallel > 1
    world = 4 if p.tensor_parallel * p.pipeline_parallel > 1 else 2
    cfg.save_dir, cfg.debug_kill, cfg.steps = str(save_dir), kill, STEPS[type(cfg).__name__]
    cfg.save_interval, cfg.log_interval, cfg.keep_last = 2, 1, 2
    if isinstance(cfg, ARRunConfig):
        s = cfg.schedule
        s.warmup_steps = min(s.warmup_steps, 1)
        s.decay_steps = None
        s.wsd_decay_steps = min(s.wsd_decay_steps, cfg.steps // 2)
        cfg.data.blend = [0.7, str(root / "data" / "a"), 0.3, str(root / "data" / "b")]
        cfg.data.seq_length, cfg.data.global_batch_size, cfg.data.micro_batch_size = 64, 8, 2
        cfg.data.eod_id, cfg.data.cache_dir = 1, str(root / "cache")
        cfg.init_from = str(root / "init") if cfg.init_from else None
        if cfg.precision == "auto":
            cfg.precision = "fp32"
        return cfg, world
    if isinstance(cfg, GRPORunConfig):
        cfg.init_from, cfg.text_tokenizer = str(root / "init"), str(root / "text")
        cfg.image_tokenizer, cfg.decoder = str(root / "imgtok"), str(root / "decoder")
        cfg.image_height = cfg.image_width = 64
        cfg.prompts_per_step, cfg.group_size, cfg.grpo.micro_batch_size = 2, 4, 4
        cfg.decoder_steps, cfg.rewards, cfg.reward_args, cfg.optim.lr = 2, {"world_alignment": 1.0}, {}, 1e-3
        # the random tiny decoder gives most groups equal rewards: keep them, so that every step trains
        cfg.grpo.drop_zero_variance_groups = False
        if not cfg.prompts.is_world:  # a recipe's prompt file: world prompts written as JSONL (world_prompts.jsonl)
            cfg.prompts.source = str(root / "world_prompts.jsonl")
        world = 2 * p.tensor_parallel * p.pipeline_parallel  # DP 2
        return cfg, world
    pytest.fail(f"recipe {name} has config type {type(cfg).__name__}: add its shrink rule to this matrix")


def _shrunk_decoder(cfg, save_dir: Path, kill: str):
    """The tiny decoder, conditioned by a random tiny tokenizer, on 48 px world images, FSDP2 over 2 ranks."""
    cfg.save_dir, cfg.debug_kill, cfg.steps = str(save_dir), kill, STEPS["DecoderRunConfig"]
    cfg.save_interval, cfg.log_interval, cfg.keep_last = 2, 1, 2
    cfg.preset, cfg.init_from, cfg.pretrained_path, cfg.image_tokenizer = "tiny", None, None, "tiny"
    cfg.corpus, cfg.preprocess, cfg.image_size, cfg.batch_size = "world", "fixed", 48, 4
    cfg.vae_fit_steps, cfg.sample_every, cfg.export = 0, 0, True
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, 1)
    return cfg


def _shrunk_contrastive(cfg, root: Path, save_dir: Path, kill: str):
    """The contrastive stage keeps its model (tiny ViT at its patch, text tower) and schedule style; the
    global batch of 128 becomes 8 (4 per rank: the loss still spans both ranks' rows)."""
    cfg.save_dir, cfg.debug_kill, cfg.steps = str(save_dir), kill, STEPS["SiglipContrastiveRunConfig"]
    cfg.save_interval, cfg.log_interval, cfg.keep_last = 2, 1, 2
    cfg.data.corpus, cfg.data.text_tokenizer, cfg.data.batch_size = str(root / "corpus"), str(root / "text"), 8
    cfg.schedule.warmup_steps, cfg.schedule.decay_steps = min(cfg.schedule.warmup_steps, 1), None
    cfg.eval.world_samples = min(cfg.eval.world_samples, 4)
    return cfg


def _shrunk_siglip_vq(cfg, root: Path, save_dir: Path, kill: str):
    cfg.save_dir, cfg.debug_kill, cfg.steps = str(save_dir), kill, STEPS["SiglipVQRunConfig"]
    cfg.save_interval, cfg.log_interval, cfg.keep_last = 2, 1, 2
    t = cfg.tokenizer
    if t.preset != "tiny":  # the X-Omni recipe: SigLIP2 weights from a local checkpoint, here a tiny one
        t.siglip_path = str(root / "siglip")
    t.preset = "tiny"
    t.overrides = {**t.overrides, "skip_quant_prob": 0.5}  # exercise the per-rank quantizer RNG
    if cfg.teacher.checkpoint:
        cfg.teacher.checkpoint = str(root / "init")
    cfg.teacher.warmup_steps = min(cfg.teacher.warmup_steps, 2)
    cfg.teacher.warmup_records, cfg.teacher.warmup_batch_size = 32, 8
    d = cfg.data
    d.corpus, d.text_tokenizer, d.preprocess = str(root / "corpus"), str(root / "text"), "tiny"
    d.batch_size, d.max_text_tokens = 4, min(d.max_text_tokens, 64)
    s = cfg.schedule
    s.warmup_steps, s.decay_steps = min(s.warmup_steps, 1), None
    c = cfg.codebook
    c.reseed_every = 3
    c.reseed_until = None if c.reseed_until is None else 4
    e = cfg.eval
    e.world_samples = min(e.world_samples, 4)
    e.corpus = str(root / "corpus") if e.corpus else None
    e.corpus_samples, e.batch_size = 4, 4
    return cfg


def _shrunk_one_process(cfg, root: Path, save_dir: Path, kill: str):
    from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig
    from megatron_xomni.training.text_tokenizer import TextTokenizerRunConfig

    cfg.save_dir, cfg.debug_kill = str(save_dir), kill
    if isinstance(cfg, TokenizeRunConfig):
        cfg.corpus, cfg.text_tokenizer, cfg.image_tokenizer = str(root / "corpus"), str(root / "text"), str(root / "imgtok")
        cfg.device, cfg.preprocess, cfg.text_vocab_size = "cpu", "tiny", 512
        cfg.workers, cfg.batch_size, cfg.progress = min(cfg.workers, 2), 4, False
        return cfg
    if isinstance(cfg, TextTokenizerRunConfig):
        if cfg.source == "hf":
            cfg.hf_path, cfg.text_vocab_size = str(root / "hf_text"), 512
        cfg.world_samples = min(cfg.world_samples, 200)
        return cfg
    pytest.fail(f"recipe of {type(cfg).__name__}: add its one-process shrink rule to this matrix")


def _make_init(rank, world, root):
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import model_sharded_state_dict

    pg = initialize_parallel(ParallelConfig(), seed=3)
    chunks = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    save_checkpoint(f"{root}/init", 0, model_sharded_state_dict(chunks), {"model_config": model_preset("tiny").to_dict()})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Token data (a weighted blend of two files), a tiny init checkpoint and a tiny GRPO bundle."""
    from megatron_xomni.data import write_world_corpus
    from megatron_xomni.data.prompts import PromptConfig, make_prompt_source
    from megatron_xomni.data.synthetic_tokens import write_synthetic_tokens
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    root = tmp_path_factory.mktemp("matrix")
    write_synthetic_tokens(root / "data" / "a", 200, 512, 256, seed=0)
    write_synthetic_tokens(root / "data" / "b", 120, 512, 256, seed=1)
    torch.manual_seed(0)
    SiglipVQTokenizer(tokenizer_config("tiny")).save_pretrained(root / "imgtok")
    build_decoder(decoder_config("tiny", "image")).save_pretrained(root / "decoder")
    XOmniTextTokenizer.from_sentencepiece(train_sentencepiece(world_texts(400), root / "sp", vocab_size=512)).save(root / "text")
    run_ranks(_make_init, 1, str(root))
    rows = make_prompt_source(PromptConfig(skills=["counting", "colors", "position"])).rows(range(16))
    (root / "world_prompts.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("prompt", "include", "text")}) + "\n"
                                                      for r in rows))
    write_world_corpus(root / "corpus", 64, seed=0, samples_per_shard=16)  # 4 shards
    _write_siglip(root / "siglip")
    _write_hf_text_tokenizer(root / "hf_text", world_texts(200))
    return root


def _write_siglip(folder: Path) -> None:
    """A local transformers SigLIP vision checkpoint of the tiny tokenizer's encoder shape (4x4 positions)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128)).save_pretrained(folder)


def _write_hf_text_tokenizer(folder: Path, texts: list) -> None:
    """A byte-level BPE tokenizer folder (the Qwen2.5 kind, without X-Omni's specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)


def _train(rank, world, cfg):
    from megatron_xomni.train import run_config  # the same dispatch as python -m megatron_xomni.train

    return run_config(cfg)


def _loss(rec: dict):
    return rec.get("train_loss", rec.get("grpo_loss"))


def _losses(save_dir: Path) -> dict[int, float]:
    """The last logged training loss per iteration (eval records carry none)."""
    out = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if _loss(rec) is not None:
            out[rec["iteration"]] = _loss(rec)
    return out


def _final_state(save_dir: Path, steps: int) -> dict:
    """Every tensor of the final checkpoint (model and optimizer) as a plain global tensor."""
    return plain_state(save_dir / f"iter_{steps:07d}")


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", _cases())
def test_recipe_survives_sigkill_and_resumes_bit_identical(world, name, extra, tmp_path):
    cfg, nproc = _shrunk(name, world, tmp_path / "ref", extra)
    if not cfg.DISTRIBUTED:
        return _check_one_process_stage(name, world, tmp_path)
    assert run_ranks(_train, nproc, cfg, timeout=400) == [0] * nproc

    rng = random.Random(zlib.crc32(name.encode()))  # a seeded step per recipe, past at least one checkpoint
    point = rng.choice(["after_step", "in_save"])
    step = rng.choice(range(3, cfg.steps)) if point == "after_step" else 4
    killed, _ = _shrunk(name, world, tmp_path / "killed", extra, kill=f"{point}:{step}")
    with pytest.raises(RuntimeError, match=r"died with exit code -9"):  # SIGKILL, not an error exit
        run_ranks(_train, nproc, killed, timeout=400)
    published = int((tmp_path / "killed" / "latest_checkpointed_iteration.txt").read_text())
    # the newest complete save: saves every 2 steps; after_step:k dies before step k's save
    assert published == (step - 2 if point == "in_save" else (step - 1) // 2 * 2)

    resumed, _ = _shrunk(name, world, tmp_path / "killed", extra)
    assert run_ranks(_train, nproc, resumed, timeout=400) == [0] * nproc
    kept = sorted(p.name for p in (tmp_path / "killed").glob("iter_*"))
    assert kept == [f"iter_{i:07d}" for i in (cfg.steps - 2, cfg.steps)]  # keep_last=2: the newest two
    first_after = min(k for k, _ in _metrics_since_resume(tmp_path / "killed", published))
    assert first_after == published + 1

    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")
    ref, got = _final_state(tmp_path / "ref", cfg.steps), _final_state(tmp_path / "killed", cfg.steps)
    # megatron-core: optimizer.state.exp_avg_sq.<param>; torch DCP: optimizer.state.<param>.exp_avg_sq
    assert any(k.startswith("optimizer.state.") and ".exp_avg_sq." in k + "." for k in ref), "no optimizer moments were saved"
    assert_same_state(ref, got)


def _metrics_since_resume(save_dir: Path, published: int):
    """(iteration, record) pairs the resumed run logged (it re-logs everything after `published`)."""
    recs = [json.loads(l) for l in (save_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if _loss(r) is not None]  # training steps only (eval records come and go)
    last_seen, out = 0, []
    for rec in recs:
        if rec["iteration"] <= last_seen:  # the log restarts: this is the resumed run
            out = []
        last_seen = rec["iteration"]
        out.append((rec["iteration"], rec))
    return out


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every output file (paths inside JSON summaries made relative to the folder)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "run_config.json":
            data = p.read_bytes()
            out[str(p.relative_to(folder))] = data.replace(str(folder).encode(), b"<save_dir>") if p.suffix == ".json" else data
    return out


def _check_one_process_stage(name: str, root: Path, tmp_path: Path) -> None:
    """A one-process, non-iterative stage: SIGKILL at a seeded fault point, rerun, byte-identical outputs."""
    from megatron_xomni.inference.tokenize_corpus import TokenizeRunConfig

    ref, _ = _shrunk(name, root, tmp_path / "ref", [])
    assert run_ranks(_train, 1, ref, timeout=400) == [0]
    rng = random.Random(zlib.crc32(name.encode()))
    if isinstance(ref, TokenizeRunConfig):  # after the k-th of 4 shards, or in the merge
        kill = rng.choice(["after_step:1", "after_step:2", "after_step:3", "in_save:4"])
    else:
        kill = "in_save:1"
    killed, _ = _shrunk(name, root, tmp_path / "out", [], kill=kill)
    with pytest.raises(RuntimeError, match=r"died with exit code -9"):
        run_ranks(_train, 1, killed, timeout=400)
    if isinstance(ref, TokenizeRunConfig):
        parts = tmp_path / "out" / f"{ref.prefix}.parts"
        done = sorted(p.name for p in parts.glob("done-*.json"))
        k = 4 if kill.startswith("in_save") else int(kill.split(":")[1])
        # one worker: exactly k shards are done; with a pool, shards in flight may have finished too
        assert len(done) == k if ref.workers == 1 else k <= len(done) <= 4, done
        assert not (tmp_path / "out" / f"{ref.prefix}.json").exists()  # no summary: not complete
    else:
        assert not (tmp_path / "out").exists() and (tmp_path / "out.tmp").is_dir()  # written, not published
    again, _ = _shrunk(name, root, tmp_path / "out", [])
    assert run_ranks(_train, 1, again, timeout=400) == [0]
    got, want = _outputs(tmp_path / "out"), _outputs(tmp_path / "ref")
    assert sorted(got) == sorted(want) and got == want, f"{name}: outputs differ after the kill at {kill}"
    assert len(want) >= 3
