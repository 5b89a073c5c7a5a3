"""`xomni evaluate --benchmark world`: the one evaluation path (the demo's too). eval.json is checked
against values recomputed here from the saved images with the world detector itself (not the reward
plugin), and the rendering ceiling against ground-truth images encoded and decoded by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.inference.fixtures import no_loading  # noqa: F401  (fixture)
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(300)
SKILLS = "counting,colors,position"
N_IMG, SEED, STEPS = 3, 5, 1


def _evaluate(rank, world, bundle, out, *extra):
    from megatron_xomni import cli

    return cli.main(["evaluate", "--benchmark", "world", "--bundle", str(bundle), "--per-skill", "1",
                     "--skills", SKILLS, "--images-per-prompt", str(N_IMG), "--size", "64x64", "--seed", str(SEED),
                     "--decoder-steps", str(STEPS), "--batch-size", "2", "--no-progress", "--out", str(out), *extra])


def _evaluate_both(rank, world, bundle, one, four):
    return _evaluate(rank, world, bundle, one), _evaluate(rank, world, bundle, four, "--decoder-seeds", "4")


def _ceiling_by_hand(rank, world, bundle, prompts, seeds):
    import torch

    from megatron_xomni.models.flux_decoder import XOmniDecoder
    from megatron_xomni.models.flux_decoder.sampling import sample_from_codes
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer

    tok = SiglipVQTokenizer.from_pretrained(bundle / "image_tokenizer").eval()
    dec = XOmniDecoder.from_pretrained(bundle / "decoder").eval()
    pixels = torch.stack([torch.from_numpy(np.asarray(p.image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for p in prompts])
    with torch.no_grad():
        codes = tok.encode(pixels)
        out = sample_from_codes(dec, tok, codes, prompts=[p.caption for p in prompts], num_inference_steps=STEPS,
                                generator=seeds)
    return [((((x + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in out]


def test_world_evaluation_writes_the_policy_report(bundle, tmp_path):
    from megatron_xomni.evaluation.world_bench import world_benchmark_prompts
    from megatron_xomni.world.detector import score_image

    out = tmp_path / "eval"
    assert run_ranks(_evaluate, 1, bundle, out) == [0]
    report = json.loads((out / "eval.json").read_text())
    prompts = world_benchmark_prompts(n_per_skill=1, height=64, width=64, skills=SKILLS.split(","))
    images = [[Image.open(out / "images" / f"{i:04d}_{j}.png").convert("RGB") for j in range(N_IMG)]
              for i in range(len(prompts))]
    fractions = [[score_image(im, p.meta)["fraction"] for im in imgs] for p, imgs in zip(prompts, images)]

    assert report["num_prompts"] == len(prompts) == 3 and report["samples_per_prompt"] == N_IMG
    assert report["seed"] == SEED and report["checkpoint"].endswith("iter_0000000")
    assert report["mean_reward"] == pytest.approx(np.mean(fractions), abs=1e-12)
    assert report["best_of_n_reward"] == pytest.approx(np.mean([max(f) for f in fractions]), abs=1e-12)
    assert report["mean_reward"] <= report["best_of_n_reward"]
    world = json.loads((out / "world.json").read_text())
    assert report["per_skill"] == world["per_skill"] and set(report["per_skill"]) == set(SKILLS.split(","))
    assert report["accuracy"] == world["overall"]

    # the ceiling: ground-truth images -> tokenizer codes -> decoder, seeded after every sample's seed
    seeds = [SEED + len(prompts) * N_IMG + i for i in range(len(prompts))]
    renders, = run_ranks(_ceiling_by_hand, 1, bundle, prompts, seeds)
    ceiling = np.mean([score_image(Image.fromarray(a), p.meta)["fraction"] for a, p in zip(renders, prompts)])
    assert report["ground_truth_codes_reward"] == pytest.approx(ceiling, abs=1e-12)

    with Image.open(out / "samples.png") as grid:  # ground truth + 3 samples per row, one row per prompt
        assert grid.size == (64 * (N_IMG + 1), 64 * len(prompts))
        np.testing.assert_array_equal(np.asarray(grid.convert("RGB"))[64:128, 64:128], np.asarray(images[1][0]))


@pytest.mark.parametrize("extra,words", [
    (["--skills", "colors,juggling"], "unknown world skill 'juggling'"),
    (["--rewards", "world_alignment=0"], "must be a positive number"),
    (["--rewards", "aesthetics=1"], "unknown reward 'aesthetics'"),
])
def test_bad_evaluation_options_fail_first(bundle, tmp_path, capsys, no_loading, extra, words):
    from megatron_xomni import cli

    rc = cli.main(["evaluate", "--benchmark", "world", "--bundle", str(bundle), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
    assert no_loading == [] and not (tmp_path / "o").exists()


def test_skills_belong_to_the_world_benchmark(bundle, tmp_path, capsys, no_loading):
    from megatron_xomni import cli

    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps({"tag": "colors", "include": [{"class": "car", "count": 1}], "prompt": "a car"}) + "\n")
    rc = cli.main(["evaluate", "--benchmark", "geneval", "--prompts", str(src), "--skills", "colors",
                   "--bundle", str(bundle), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--skills selects world skills" in capsys.readouterr().err


def test_decoder_seeds_add_the_noise_floor_and_the_honest_best_of_n(bundle, tmp_path):
    from megatron_xomni.world.detector import score_image

    one, four = tmp_path / "k1", tmp_path / "k4"
    assert run_ranks(_evaluate_both, 1, bundle, one, four) == [(0, 0)]
    r1, r4 = (json.loads((d / "eval.json").read_text()) for d in (one, four))
    # decode 0 is the K = 1 evaluation, image for image
    for i in range(3):
        for j in range(N_IMG):
            a, b = (np.asarray(Image.open(d / "images" / f"{i:04d}_{j}.png")) for d in (one, four))
            np.testing.assert_array_equal(a, b)
    assert r4["mean_reward"] == r1["mean_reward"] and r4["best_of_n_reward"] == r1["best_of_n_reward"]
    tables = np.asarray(r4["decode_rewards"])  # [decode, prompt, sample]
    assert tables.shape == (4, 3, N_IMG) and r4["decoder_seeds"] == 4
    from megatron_xomni.evaluation.world_bench import world_benchmark_prompts

    prompts = world_benchmark_prompts(n_per_skill=1, height=64, width=64, skills=SKILLS.split(","))
    for i, p in enumerate(prompts):
        for j in range(N_IMG):
            im = Image.open(four / "images" / f"{i:04d}_{j}.png").convert("RGB")
            assert tables[0, i, j] == score_image(im, p.meta)["fraction"]
    # figures recomputed here from the table: pick on decode 0, score by decodes 1-3; ANOVA over decodes
    pick = tables[0].argmax(axis=1)
    fresh = tables[1:].mean(axis=0)
    assert r4["honest_best_of_n_reward"] == pytest.approx(np.mean(fresh[np.arange(3), pick]), abs=1e-12)
    r = tables.transpose(1, 2, 0)
    nf = r4["noise_floor"]
    assert nf["within_decoder"] == pytest.approx(np.mean([[np.var(r[i, j]) for j in range(N_IMG)] for i in range(3)]))
    assert nf["within_tokens"] + nf["within_decoder"] == pytest.approx(nf["within_total"], abs=1e-12)
    assert nf["shared_seed_decodes"] == 3
    assert r4["mean_reward_all_decodes"] == pytest.approx(tables.mean(), abs=1e-12)
