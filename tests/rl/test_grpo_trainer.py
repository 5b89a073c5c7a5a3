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
    # The random tiny decoder renders near-constant images, so most groups have zero reward variance:
    # dropping is off here so that every step trains (tests/rl/test_zero_variance_groups.py covers it).
    keep = "grpo.drop_zero_variance_groups=false"
    full = run_trainer(2, "tiny_grpo", _ov(artifacts, "full", "steps=3", keep), artifacts)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = _metrics(artifacts / "full" / "metrics.jsonl")
    assert sorted(ref) == [1, 2, 3]
    for key in ["reward_mean", "reward_min", "reward_max", "reward_world_alignment", "grpo_kl", "grpo_clip_fraction",
                "grpo_entropy", "grpo_response_length", "time_rollout", "time_decode_and_reward", "time_logprob",
                "time_update", "perf_rollout_tokens_per_s", "grpo_dropped_group_share", "grpo_dropped_groups"]:
        assert key in ref[3], key
    assert ref[1]["grpo_kl"] == pytest.approx(0.0, abs=1e-7)  # on-policy first step: policy == reference
    assert ref[3]["grpo_response_length"] == 16  # 4x4 sampled codes (<EOM> is forced, not sampled)

    assert all(ref[i]["grpo_dropped_group_share"] == 0.0 for i in ref)
    part = run_trainer(2, "tiny_grpo", _ov(artifacts, "split", "steps=2", keep), artifacts)
    assert part.returncode == 0, part.stderr[-3000:]
    rest = run_trainer(2, "tiny_grpo", _ov(artifacts, "split", "steps=3", keep), artifacts)
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr[-3000:]
    got = _metrics(artifacts / "split" / "metrics.jsonl")
    for key in ["reward_mean", "grpo_loss", "grpo_kl", "grpo_entropy"]:
        assert got[3][key] == ref[3][key], key


def _prompt_file(root):
    """8 rows = 2 steps x 4 prompts (read in file order): world rows (include, text null), text rows
    (text, include null) and rows lacking one field or both."""
    from megatron_xomni.world import sample_world

    def world(i, skill):
        s = sample_world(i, seed=9, height=64, width=64, skill=skill)
        return {"prompt": s.caption, "include": s.meta["include"], "text": None}

    rows = [world(0, "counting"), {"prompt": 'a photo of the text "cat"', "text": "cat", "include": None},
            {"prompt": world(1, "colors")["prompt"], "include": world(1, "colors")["include"]},  # lacks text
            {"prompt": 'a photo of the text "dog"', "text": "dog"},  # lacks include
            world(2, "position"), {"prompt": "a quiet lake"},  # lacks both
            {"prompt": 'a photo of the text "sun"', "text": "sun", "include": None}, world(3, "single_object")]
    path = root / "rl_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_grpo_trains_two_steps_from_a_jsonl_prompt_file_with_world_and_ocr_rewards(artifacts):
    path, rows = _prompt_file(artifacts)
    extra = [f"prompts.source={path}", "prompts.shuffle=false", 'rewards={"world_alignment": 1.0, "ocr_text": 1.0}']
    out = run_trainer(2, "tiny_grpo", _ov(artifacts, "jsonl", "steps=2", *extra), artifacts)
    assert out.returncode == 0, out.stderr[-3000:]
    got = _metrics(artifacts / "jsonl" / "metrics.jsonl")
    assert sorted(got) == [1, 2]
    G = 4
    for it, block in ((1, rows[0:4]), (2, rows[4:8])):  # step s reads rows 4s..4s+3 (2 per DP replica)
        want = {name: G * sum(field not in r for r in block) for name, field in (("world_alignment", "include"), ("ocr_text", "text"))}
        rec = got[it]
        # counted over both replicas: the rows lacking a field fall on one replica or the other
        assert rec["reward_world_alignment_missing_fields"] == want["world_alignment"]
        assert rec["reward_ocr_text_missing_fields"] == want["ocr_text"]
        assert rec["reward_failures"] == want["world_alignment"] + want["ocr_text"]
        assert 0.0 <= rec["reward_ocr_text"] <= 1.0 and 0.0 <= rec["reward_world_alignment"] <= 1.0
        # dropping is on (the default): a step whose rewards are all equal trains nothing
        assert 0.0 <= rec["grpo_dropped_group_share"] <= 1.0
        if rec["reward_min"] == rec["reward_max"]:
            assert rec["grpo_dropped_group_share"] == 1.0 and rec["grpo_skipped_updates"] == 1
    cfg = json.loads((artifacts / "jsonl" / "run_config.json").read_text())
    assert cfg["prompts"]["source"] == str(path)


def test_a_prompt_file_without_a_field_a_reward_needs_is_refused_at_start(artifacts, tmp_path):
    import subprocess
    import sys

    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\na quiet lake\n")
    cmd = [sys.executable, "-m", "megatron_xomni.train", "tiny_grpo",
           *_ov(artifacts, "refused", f"prompts.source={plain}", 'rewards={"world_alignment": 1.0, "ocr_text": 1.0}')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert err == [f"error: prompt source {plain}: no row has a value for the 'include' field, which reward "
                   "'world_alignment' reads; add 'include' to the rows that need it or drop 'world_alignment' from the rewards"]
    assert not (artifacts / "refused").exists()  # nothing started


def test_old_prompt_knobs_name_the_new_ones():
    from megatron_xomni.recipes import load_recipe

    with pytest.raises(ValueError, match=r"`prompt_skills` is now `prompts.skills`: write prompts.skills=\[\"counting\"\]"):
        load_recipe("tiny_grpo", ['prompt_skills=["counting"]'])
    with pytest.raises(ValueError, match="`prompt_seed` is now `prompts.seed`"):
        load_recipe("tiny_grpo", ["prompt_seed=3"])


def test_decode_steps_knob_is_checked_before_any_process_group():
    from megatron_xomni.recipes import load_recipe

    assert load_recipe("tiny_grpo", ["decode_steps=static"]).decode_steps == "static"
    with pytest.raises(ValueError, match="decode_steps='graph': expected one of dynamic, static, cuda_graph"):
        load_recipe("tiny_grpo", ["decode_steps=graph"]).validate(1)
    with pytest.raises(ValueError, match="runs one pipeline stage and one model chunk: set decode_steps='dynamic'"):
        load_recipe("tiny_grpo", ["decode_steps=cuda_graph", "parallel.pipeline_parallel=2"]).validate(2)


def test_7b_recipe_renders_without_its_inputs_and_checks_them_at_start(tmp_path):
    from megatron_xomni.recipes import load_recipe

    cfg = load_recipe("xomni_7b_grpo")
    assert cfg.prompts.source.endswith(".jsonl") and set(cfg.rewards) == {"hpsv2", "vlm_judge", "ocr_text"}
    cfg.validate(32)  # layout and types only: nothing of it exists here
    with pytest.raises(ValueError, match="init_from=runs/xomni_7b_sft does not exist"):
        cfg.check_paths()
    for name in ("init_from", "text_tokenizer", "image_tokenizer", "decoder"):
        (tmp_path / name).mkdir()
        setattr(cfg, name, str(tmp_path / name))
    with pytest.raises(ValueError, match="image tokenizer config .* does not exist"):
        cfg.check_paths()  # the grid is checked against the tokenizer's patch before anything is loaded
    from megatron_xomni.models.siglip_vq import SigLIPVQConfig, SiglipVQTokenizer

    SiglipVQTokenizer(SigLIPVQConfig(patch_size=16, width=32, num_layers=1, num_heads=2, mlp_dim=64, pos_grid=4,
                                     codebook_size=16, codebook_dim=8, adapter_dim=32)).save_pretrained(
        tmp_path / "image_tokenizer")
    with pytest.raises(ValueError, match=r"reward 'hpsv2': ckpt/hpsv2 is not a local Hugging Face checkpoint"):
        cfg.check_paths()
    for name in ("hpsv2", "vlm_judge"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        cfg.reward_args[name]["model_dir"] = str(tmp_path / name)
    with pytest.raises(ValueError, match="data/xomni/rl_prompts.jsonl does not exist"):
        cfg.check_paths()
    cfg.prompts.source = str(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a sign that says OPEN", "text": "OPEN"}\n{"prompt": "a lake"}\n')
    assert cfg.check_paths()[0]["prompt"] in ("a sign that says OPEN", "a lake")
    cfg.reward_args["vlm_judge"]["bogus"] = 1
    with pytest.raises(ValueError, match="bad arguments for reward 'vlm_judge'"):
        cfg.validate(32)
