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

GRPO recipes run on a tiny random bundle (SFT checkpoint, tokenizers, decoder) built here, with the world
reward only (a recipe's prompt file becomes world prompts written as JSONL, its HF reward models are not here), for 4
steps instead of 6. One extra case runs PT-1 (frozen LM, distributed optimizer) with interleaved
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

STEPS = {"ARRunConfig": 6, "GRPORunConfig": 4}
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

    cfg = load_recipe(name)
    cfg.save_dir, cfg.debug_kill, cfg.steps = str(save_dir), kill, STEPS.get(type(cfg).__name__, 4)
    cfg.save_interval, cfg.log_interval, cfg.keep_last = 2, 1, 2
    if not hasattr(cfg, "parallel"):  # stages without a megatron-core model
        return _shrunk_other(cfg, name)
    cfg.model = model_preset("tiny")
    apply_overrides(cfg, extra)
    p = cfg.parallel
    p.tensor_parallel = min(p.tensor_parallel, 2)
    p.context_parallel = 1
    p.sequence_parallel = p.sequence_parallel and p.tensor_parallel > 1
    world = 4 if p.tensor_parallel * p.pipeline_parallel > 1 else 2
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
        if not cfg.prompts.is_world:  # a recipe's prompt file: world prompts written as JSONL (world_prompts.jsonl)
            cfg.prompts.source = str(root / "world_prompts.jsonl")
        world = 2 * p.tensor_parallel * p.pipeline_parallel  # DP 2
        return cfg, world
    pytest.fail(f"recipe {name} has config type {type(cfg).__name__}: add its shrink rule to this matrix")


def _shrunk_other(cfg, name: str):
    from megatron_xomni.training.flux_decoder import DecoderRunConfig

    if isinstance(cfg, DecoderRunConfig):  # the tiny decoder from a random tiny tokenizer on 48 px world images
        cfg.preset, cfg.init_from, cfg.pretrained_path, cfg.image_tokenizer = "tiny", None, None, "tiny"
        cfg.corpus, cfg.preprocess, cfg.image_size, cfg.batch_size = "world", "fixed", 48, 4
        cfg.vae_fit_steps, cfg.sample_every, cfg.export = 0, 0, True
        cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, 1)
        return cfg, 2  # FSDP2 over 2 ranks
    pytest.fail(f"recipe {name} has config type {type(cfg).__name__}: add its shrink rule to this matrix")


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
    return root


def _train(rank, world, cfg):
    from megatron_xomni.train import run_config

    return run_config(cfg)


def _losses(save_dir: Path) -> dict[int, float]:
    out = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["iteration"]] = rec.get("train_loss", rec.get("grpo_loss"))
    return out


def _final_state(save_dir: Path, steps: int) -> dict:
    """The final weights (and optimizer state, for megatron-core checkpoints)."""
    if (save_dir / "export" / "transformer").is_dir():  # a decoder: its exported (unsharded) weights
        from safetensors.torch import load_file

        return {f"{f.name}:{k}": v for f in sorted((save_dir / "export").rglob("*.safetensors"))
                for k, v in load_file(str(f)).items()}
    return plain_state(save_dir / f"iter_{steps:07d}")


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", _cases())
def test_recipe_survives_sigkill_and_resumes_bit_identical(world, name, extra, tmp_path):
    cfg, nproc = _shrunk(name, world, tmp_path / "ref", extra)
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
    first_after = min(k for k, _ in _metrics_since_resume(tmp_path / "killed", published))
    assert first_after == published + 1

    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")
    ref, got = _final_state(tmp_path / "ref", cfg.steps), _final_state(tmp_path / "killed", cfg.steps)
    if (tmp_path / "ref" / f"iter_{cfg.steps:07d}" / "common.pt").exists():  # a megatron-core checkpoint
        assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in ref), "no optimizer moments were saved"
    assert ref and len(ref) == len(got)
    assert_same_state(ref, got)


def _metrics_since_resume(save_dir: Path, published: int):
    """(iteration, record) pairs the resumed run logged (it re-logs everything after `published`)."""
    recs = [json.loads(l) for l in (save_dir / "metrics.jsonl").read_text().splitlines()]
    last_seen, out = 0, []
    for rec in recs:
        if rec["iteration"] <= last_seen:  # the log restarts: this is the resumed run
            out = []
        last_seen = rec["iteration"]
        out.append((rec["iteration"], rec))
    return out
