"""Sharded decoding and scoring over the model-parallel peers equals the redundant path (issue 13)."""

from __future__ import annotations

import numpy as np
import torch

from tests.multirank import run_ranks


def _mean_red(prompts, images, metas):
    """A dense test reward: mean red value (varies per image); 'skip' rows are not applicable."""
    return [None if m.get("skip") else float(np.asarray(im)[..., 0].mean()) / 255.0 for im, m in zip(images, metas)]


def _score(rank, world):
    from megatron_xomni.data.prompts import PromptConfig, make_prompt_source
    from megatron_xomni.inference.render import Renderer
    from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.rewards import RewardEnsemble
    from megatron_xomni.rewards.registry import register_reward
    from megatron_xomni.rl.scoring import decode_and_score

    pg = initialize_parallel(ParallelConfig(tensor_parallel=2), seed=0)  # TP peers hold the same rollouts
    register_reward("test_mean_red", override=True)(lambda: _mean_red)
    torch.manual_seed(0)  # the same frozen modules on every rank
    tok = SiglipVQTokenizer(tokenizer_config("tiny"))
    renderer = Renderer(tok, build_decoder(decoder_config("tiny", "image"), seed=1), steps=2, batch_size=2)
    n = 7  # not a multiple of batch x group: the last batch is short
    rows = make_prompt_source(PromptConfig(source="world", split="heldout")).rows(range(n))
    h, w = 64 // renderer.patch, 64 // renderer.patch
    codes = torch.randint(0, tok.cfg.codebook_size, (n, h, w), generator=torch.Generator().manual_seed(2))
    seeds = [11 * i + 3 for i in range(n)]
    captions = [r["prompt"] for r in rows]
    metas = [dict(r) for r in rows]
    metas[2].pop("include")  # a row lacking world_alignment's field: a counted failure
    metas[4]["skip"] = True
    rewards = RewardEnsemble({"world_alignment": 1.0, "test_mean_red": 2.0})
    mine, sharded = decode_and_score(renderer, rewards, codes, seeds, captions, metas, group=pg.mp)
    full_images, redundant = decode_and_score(renderer, rewards, codes, seeds, captions, metas, group=None)
    image_diff = max(np.abs(np.asarray(im, dtype=int) - np.asarray(full_images[i], dtype=int)).max() for i, im in mine.items())
    return sorted(mine), sharded, redundant, image_diff


def test_sharded_scoring_equals_redundant_path():
    results = run_ranks(_score, 2)
    assert [r[0] for r in results] == [[0, 1, 4, 5], [2, 3, 6]]  # each peer decoded only its share, in whole renderer batches
    for _, sharded, redundant, image_diff in results:
        assert image_diff == 0  # each image rendered in the same batch as in the full call
        assert sharded.total == redundant.total and sharded.components == redundant.components
        assert sharded.failures == redundant.failures == {"world_alignment": [2]}
        assert sharded.missing_fields == redundant.missing_fields == {"world_alignment": 1}
    totals = results[0][1].total
    assert results[1][1].total == totals and len(set(totals)) == len(totals)  # non-degenerate, identical on peers
    assert results[0][1].components["test_mean_red"][4] is None
