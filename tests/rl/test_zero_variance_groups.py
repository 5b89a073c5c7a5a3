"""Zero-variance groups are dropped from the GRPO update and counted (2 real gloo ranks, DP=2).

The gradient megatron-core's schedule produces with zero-variance groups present must equal the
gradient without them, and both must equal autograd of the GRPO objective written out in
test_rollout_grpo_parallel (clipped surrogate + k3 KL, mean over the kept sequences). The KL
weight is large and the reference perturbed, so a zero-variance group that were *not* dropped
would move the gradient through its KL term and the normaliser (checked too).
"""

import pytest
import torch

from tests.multirank import run_ranks
from tests.rl.test_rollout_grpo_parallel import EOM, G, GRID, _build, _direct_grads, _prompts, _save_models

pytestmark = pytest.mark.timeout(300)

BETA, LO, HI = 0.5, 0.2, 0.28
# rewards per group (G = 2); rank 0 holds groups 0 and 1, rank 1 groups 2 and 3
CASES = {
    "mixed": {0: [0.9, 0.1], 1: [0.5, 0.5], 2: [0.2, 0.7], 3: [0.3, 0.3]},
    "rank1_all_flat": {0: [0.9, 0.1], 1: [0.5, 0.5], 2: [0.4, 0.4], 3: [0.3, 0.3]},
    "all_flat": {0: [0.6, 0.6], 1: [0.5, 0.5], 2: [0.4, 0.4], 3: [0.3, 0.3]},
}


def _rank(rank, world, root):
    from megatron_xomni.inference.generation import RolloutConfig, generate_images
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer

    pg, policy, ref = _build(rank, world, {}, root)
    dpr = pg.dp.rank()
    cfg = RolloutConfig(sampling=SamplingConfig(temperature=1.0, min_p=0.03), samples_per_prompt=G, seed=42)
    # every replica generates all prompts (a sample depends only on its prompt id and the seed)
    everything = generate_images(policy, pg, _prompts(), GRID, EOM, cfg, prompt_ids=[0, 1, 2, 3])
    mine = [r for r in everything if r.prompt_id // 2 == dpr]
    wrapped, opt = wrap_and_build_optimizer(policy, OptimConfig(lr=0.0, clip_grad=1e9, weight_decay=0.0), pg)
    step = GRPOStep(wrapped, opt, pg, GRPOConfig(clip_eps_low=LO, clip_eps_high=HI, kl_beta=BETA, micro_batch_size=1),
                    ref_chunks=ref)
    names = [n for n, _ in wrapped[0].module.named_parameters()]

    def grads():
        return {n: p.main_grad.clone() for n, p in wrapped[0].module.named_parameters()}

    def rewards_of(rs, table):
        return [table[r.prompt_id][r.sample_id % G] for r in rs]

    def max_diff(a, b):
        return max((a[n] - b[n]).abs().max().item() for n in names)

    res = {}
    table = CASES["mixed"]
    res["mixed"] = step(mine, rewards_of(mine, table))
    g_mixed = grads()
    varied = [r for r in mine if r.prompt_id in (0, 2)]
    res["without"] = step(varied, rewards_of(varied, table))
    g_without = grads()
    kept_all = [r for r in everything if r.prompt_id in (0, 2)]
    direct, _ = _direct_grads(wrapped, ref, kept_all, rewards_of(kept_all, table), BETA, LO, HI)
    res["mixed_vs_without"] = max_diff(g_mixed, g_without)
    res["mixed_vs_direct"] = max_diff(g_mixed, direct)
    res["scale"] = max(d.abs().max().item() for d in direct.values())
    step.cfg = GRPOConfig(clip_eps_low=LO, clip_eps_high=HI, kl_beta=BETA, micro_batch_size=1,
                          drop_zero_variance_groups=False)
    res["not_dropped"] = step(mine, rewards_of(mine, table))
    res["not_dropped_vs_direct"] = max_diff(grads(), direct)

    # rank 1's groups are all flat: it forwards one zero-weight micro-batch and still all-reduces
    step.cfg = GRPOConfig(clip_eps_low=LO, clip_eps_high=HI, kl_beta=BETA, micro_batch_size=1)
    table = CASES["rank1_all_flat"]
    res["rank1_all_flat"] = step(mine, rewards_of(mine, table))
    only0 = [r for r in everything if r.prompt_id == 0]
    direct0, _ = _direct_grads(wrapped, ref, only0, rewards_of(only0, table), BETA, LO, HI)
    res["rank1_all_flat_vs_direct"] = max_diff(grads(), direct0)
    res["scale0"] = max(d.abs().max().item() for d in direct0.values())

    # nothing left anywhere: no forward, no optimizer step (a real learning rate would show a step)
    for group in opt.param_groups:
        group["lr"] = 1e-2
    before = [p.detach().clone() for p in wrapped[0].module.parameters()]
    res["all_flat"] = step(mine, rewards_of(mine, CASES["all_flat"]))
    res["all_flat_moved"] = max((p.detach() - b).abs().max().item()
                                for p, b in zip(wrapped[0].module.parameters(), before))
    res["mixed_lr_step"] = step(mine, rewards_of(mine, CASES["mixed"]))
    res["mixed_moved"] = max((p.detach() - b).abs().max().item()
                             for p, b in zip(wrapped[0].module.parameters(), before))
    return res


def _save(rank, world, root):
    _save_models(root)
    return True


def test_zero_variance_groups_give_no_gradient_and_are_counted(tmp_path):
    run_ranks(_save, 1, str(tmp_path))
    for r in run_ranks(_rank, 2, str(tmp_path)):
        tol = 1e-5 * max(1.0, r["scale"])
        assert r["mixed_vs_without"] <= tol
        assert r["mixed_vs_direct"] <= tol
        # kept in, the flat groups' KL and the larger normaliser change the gradient
        assert r["not_dropped_vs_direct"] > 100 * tol
        assert r["rank1_all_flat_vs_direct"] <= 1e-5 * max(1.0, r["scale0"])
        assert r["mixed"]["dropped_groups"] == 2 and r["mixed"]["dropped_group_share"] == 0.5
        assert r["without"]["dropped_groups"] == 0 and r["not_dropped"]["dropped_groups"] == 0
        assert r["rank1_all_flat"]["dropped_group_share"] == 0.75 and r["rank1_all_flat"]["num_updates"] == 1
        flat = r["all_flat"]
        assert flat["dropped_group_share"] == 1.0 and flat["num_updates"] == 0 and flat["skipped_updates"] == 1
        assert r["all_flat_moved"] == 0.0
        assert r["mixed_moved"] > 0.0  # the same optimizer does step when a group is kept
