"""The GRPO run end to end under torchrun (2 ranks, DP=2): rollouts -> decoder -> rewards ->
update, logging of every phase, and exact resume of a stopped run."""

import json

import pytest
import torch

from tests.multirank import run_ranks
from tests.training.launch import run_trainer


def _make_sft(rank, world, root):
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import model_sharded_state_dict

    pg = initialize_parallel(ParallelConfig(), seed=3)
    chunks = build_model_chunks(model_preset("tiny"), ParallelConfig(), pg)
    save_checkpoint(f"{root}/sft", 0, model_sharded_state_dict(chunks), {"model_config": model_preset("tiny").to_dict()})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.data.text_tokenizer import XOmniTextTokenizer, train_sentencepiece, world_texts
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    torch.manual_seed(0)
    SiglipVQTokenizer(tokenizer_config("tiny")).save_pretrained(root / "imgtok")
    build_decoder(decoder_config("tiny", "image")).save_pretrained(root / "decoder")
    XOmniTextTokenizer.from_sentencepiece(train_sentencepiece(world_texts(400), root / "sp", vocab_size=512)).save(root / "text")
    run_ranks(_make_sft, 1, str(root))
    return root


def _ov(root, save, *extra):
    return [f"init_from={root}/sft", f"text_tokenizer={root}/text", f"image_tokenizer={root}/imgtok",
            f"decoder={root}/decoder", f"save_dir={root}/{save}", "prompts_per_step=4", "group_size=4",
            "grpo.micro_batch_size=4", "decoder_steps=2", "save_interval=2", "optim.lr=1e-3", *extra]


def _metrics(path):
    return {r["iteration"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_grpo_runs_logs_every_phase_and_resumes_exactly(artifacts):
    full = run_trainer(2, "tiny_grpo", _ov(artifacts, "full", "steps=3"), artifacts)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = _metrics(artifacts / "full" / "metrics.jsonl")
    assert sorted(ref) == [1, 2, 3]
    for key in ["reward_mean", "reward_min", "reward_max", "reward_world_alignment", "grpo_kl", "grpo_clip_fraction",
                "grpo_entropy", "grpo_response_length", "time_rollout", "time_decode", "time_reward", "time_logprob",
                "time_update", "perf_rollout_tokens_per_s"]:
        assert key in ref[3], key
    assert ref[1]["grpo_kl"] == pytest.approx(0.0, abs=1e-7)  # on-policy first step: policy == reference
    assert ref[3]["grpo_response_length"] == 16  # 4x4 sampled codes (<EOM> is forced, not sampled)

    part = run_trainer(2, "tiny_grpo", _ov(artifacts, "split", "steps=2"), artifacts)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = run_trainer(2, "tiny_grpo", _ov(artifacts, "split", "steps=3"), artifacts)
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr[-3000:]
    got = _metrics(artifacts / "split" / "metrics.jsonl")
    for key in ["reward_mean", "grpo_loss", "grpo_kl", "grpo_entropy"]:
        assert got[3][key] == ref[3][key], key
