"""Rollouts, recomputed log-probs and GRPO updates on real gloo ranks at several layouts.

One TP=1 launch creates the tiny model (policy + a perturbed reference), saves both as dist
checkpoints and computes every reference value; each other layout loads the checkpoints and
must reproduce the TP=1 tokens, log-probs and GRPO statistics. Checks are grouped so that the
whole file costs three launches.
"""

import pytest
import torch

from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(400)

TEXT_V, IMG_V = 512, 256
SOM, IMAGE_TOK, EOM = 3, 6, 4
GRID = (3, 4)
G = 2


def _prompts():
    # Two prompt lengths (bucketed generation); each ends with the image prefix <SOM>h w<IMAGE>.
    prefix = [SOM, 10 + GRID[0], 10 + GRID[1], IMAGE_TOK]
    return [[101, 102, 103] + prefix, [201, 202, 203, 204, 205, 206] + prefix,
            [301, 302, 303] + prefix, [401, 402, 403, 404, 405, 406] + prefix]


def _text_prompts():
    # Understanding-style prompts: text with image tokens inside.
    return [[21, TEXT_V + 5, TEXT_V + 9, 22, 23], [31, TEXT_V + 7, 32], [41, TEXT_V + 1, TEXT_V + 2, 42, 43]]


def _reward(sample_id: int) -> float:
    return ((sample_id * 37) % 11) / 10.0


def _build(rank, world, layout, root):
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    par = ParallelConfig(**layout)
    pg = initialize_parallel(par, seed=11)
    out = []
    for name in ("policy", "ref"):
        path = resolve_checkpoint(f"{root}/{name}")
        mcfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
        chunks = build_model_chunks(mcfg, par, pg)
        load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks)))
        out.append(chunks)
    return pg, out[0], out[1]


def _save_models(root):
    from megatron_xomni.checkpointing import save_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import model_sharded_state_dict

    pg = initialize_parallel(ParallelConfig(), seed=5)
    mcfg = model_preset("tiny")
    noise = torch.Generator().manual_seed(1)
    for name, extra in (("policy", 0.0), ("ref", 0.02)):
        chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
        base = torch.Generator().manual_seed(0)  # same base weights for both; the reference is perturbed
        with torch.no_grad():
            for p in chunks[0].parameters():  # every weight random (peaked distributions)
                p.copy_(torch.randn(p.shape, generator=base) * 0.15)
                p.add_(torch.randn(p.shape, generator=noise) * extra)
        save_checkpoint(f"{root}/{name}", 0, model_sharded_state_dict(chunks), {"model_config": mcfg.to_dict()})
    return pg


def _pack(rs):
    # Plain lists: tensors in a multiprocessing queue are shared by file descriptor, which races
    # with the rank's exit.
    return [(r.prompt_id, r.sample_id, r.tokens.tolist(), r.prompt_length, r.logprobs.tolist(),
             None if r.codes is None else r.codes.tolist()) for r in rs]


def _direct_grads(policy, ref, rollouts, rewards, beta, lo, hi):
    """Gradient of the GRPO objective written out here with a plain per-sequence autograd forward."""
    model, ref_model = policy[0].module, ref[0]
    # group-normalised advantages (unbiased std, eps 1e-6)
    adv = []
    for r, rew in zip(rollouts, rewards):
        grp = torch.tensor([w for q, w in zip(rollouts, rewards) if q.prompt_id == r.prompt_id], dtype=torch.float64)
        adv.append(float((rew - grp.mean()) / (grp.std() + 1e-6)))
    total, ent_sum, ent_n = 0.0, 0.0, 0
    model.train()
    ref_model.eval()
    for r, a in zip(rollouts, adv):
        t = r.tokens.unsqueeze(0)
        pos = torch.arange(t.shape[1] - 1).unsqueeze(0)
        with torch.no_grad():  # entropy of the image-code distribution at the sampled positions
            _, img = model(t[:, :-1], pos, None, runtime_gather_output=True)
            p = torch.softmax(img[0, r.prompt_length - 1: r.prompt_length - 1 + r.num_sampled, :IMG_V].double(), -1)
            ent_sum += float(-(p * p.log()).sum())
            ent_n += r.num_sampled
        logp = -model(t[:, :-1], pos, None, labels=t[:, 1:])[0]
        with torch.no_grad():
            ref_lp = -ref_model(t[:, :-1], pos, None, labels=t[:, 1:])[0]
        sl = slice(r.prompt_length - 1, r.prompt_length - 1 + r.num_sampled)
        lp, old, rl = logp[sl], r.logprobs, ref_lp[sl]
        ratio = torch.exp(lp - old)
        surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - lo, 1 + hi) * a)
        k3 = torch.exp(rl - lp) - (rl - lp) - 1
        total = total + (-surr + beta * k3).mean()  # mean over the sequence's tokens
    # torch.autograd.grad: DDP's grad-accumulation hooks (which would add into main_grad) stay out of it.
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(total / len(rollouts), params, allow_unused=True)  # mean over sequences
    return {n: (g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)}, ent_sum / ent_n


def _rank(rank, world, root, layout, is_reference):
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep
    from megatron_xomni.rl.logprobs import compute_logprobs, pack_rollouts, split_microbatches
    from megatron_xomni.inference.generation import RolloutConfig, generate_images, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer

    pg, policy, ref = _build(rank, world, layout, root)
    dp, dpr = pg.dp.size(), pg.dp.rank()
    prompts = _prompts()
    per = len(prompts) // dp
    mine, ids = prompts[dpr * per:(dpr + 1) * per], list(range(dpr * per, (dpr + 1) * per))
    res = {"dp_rank": dpr, "last_stage": pg.pp.rank() == pg.pp.size() - 1}

    samp = SamplingConfig(temperature=1.0, min_p=0.03)
    img = {}
    for cache in (True, False):
        cfg = RolloutConfig(sampling=samp, samples_per_prompt=G, seed=42, use_kv_cache=cache, max_rows_per_forward=3)
        img[cache] = generate_images(policy, pg, mine, GRID, EOM, cfg, prompt_ids=ids)
        cfgc = RolloutConfig(sampling=SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, min_p=0.03),
                             samples_per_prompt=G, seed=7, use_kv_cache=cache, cfg_scale=3.0)
        res[f"cfg_{cache}"] = _pack(generate_images(policy, pg, mine, GRID, EOM, cfgc, prompt_ids=ids,
                                                    uncond_prompt=prompts[0][-4:]))
        cfgt = RolloutConfig(sampling=samp, samples_per_prompt=G, seed=3, use_kv_cache=cache)
        res[f"text_{cache}"] = _pack(generate_text(policy, pg, _text_prompts(), 6, None, cfgt,
                                                   prompt_ids=[0, 1, 2]))
        res[f"img_{cache}"] = _pack(img[cache])
    # Stopping: with eos = a token sampled mid-sequence, each sample is the no-eos sample cut after it.
    eos = res["text_True"][0][2][len(_text_prompts()[0]) + 2]
    res["eos"] = eos
    res["text_eos"] = _pack(generate_text(policy, pg, _text_prompts(), 6, eos, RolloutConfig(
        sampling=samp, samples_per_prompt=G, seed=3), prompt_ids=[0, 1, 2]))
    # Batch composition: prompt 1 alone gives the same samples as inside the full batch.
    if dpr == 0 and len(mine) > 1:
        res["alone"] = _pack(generate_images(policy, pg, [mine[1]], GRID, EOM, RolloutConfig(
            sampling=samp, samples_per_prompt=G, seed=42), prompt_ids=[ids[1]]))

    rollouts = img[True]
    mbs = split_microbatches(pack_rollouts(rollouts), 1)
    lp = torch.cat(compute_logprobs(policy, pg, mbs))
    diffs = []
    for i, r in enumerate(rollouts):
        s = r.prompt_length - 1
        diffs.append((lp[i, s:s + r.num_sampled] - r.logprobs).abs().max().item())
    res["recompute_diff"] = max(diffs)

    rewards = [_reward(r.sample_id) for r in rollouts]
    # lr 0 keeps the weights for the gradient check; a huge clip_grad makes the optimizer report the
    # grad norm without ever clipping.
    wrapped, opt = wrap_and_build_optimizer(policy, OptimConfig(lr=0.0, clip_grad=1e9, weight_decay=0.0), pg)
    gcfg = GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.5, micro_batch_size=1)
    step = GRPOStep(wrapped, opt, pg, gcfg, ref_chunks=ref)
    res["stats1"] = step(rollouts, rewards)
    if is_reference:
        main = {n: p.main_grad.clone() for n, p in wrapped[0].module.named_parameters()}
        direct, res["direct_entropy"] = _direct_grads(wrapped, ref, rollouts, rewards, 0.5, 0.2, 0.28)
        res["grad_diff"] = max((main[n] - direct[n]).abs().max().item() for n in direct)
        res["grad_scale"] = max(d.abs().max().item() for d in direct.values())
    # A moving policy: two epochs of two minibatches each with a real learning rate.
    for group in opt.param_groups:
        group["lr"] = 3e-3
    step.cfg = GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_beta=0.01, micro_batch_size=1,
                          ppo_epochs=2, num_minibatches=2, loss_aggregation="token")
    res["stats2"] = step(rollouts, rewards)
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    run_ranks(_save_models_entry, 1, str(root))
    (ref,) = run_ranks(_rank, 1, str(root), {}, True)
    return root, ref


def _save_models_entry(rank, world, root):
    _save_models(root)
    return True


def _tokens(packed):
    return [(p[0], p[1], p[2]) for p in packed]


def test_reference_rollouts_and_objective(reference):
    _, ref = reference
    # KV cache == full recomputation, in every mode.
    for mode in ("img", "cfg", "text"):
        assert _tokens(ref[f"{mode}_True"]) == _tokens(ref[f"{mode}_False"]), mode
        for a, b in zip(ref[f"{mode}_True"], ref[f"{mode}_False"]):
            assert (torch.tensor(a[4]) - torch.tensor(b[4])).abs().max().item() <= 1e-5
    assert _tokens(ref["cfg_True"]) != _tokens(ref["img_True"])  # guidance changes the samples
    # Image mode: exactly h*w codes in range, then <EOM>.
    for mode in ("img_True", "cfg_True"):
        for pid, sid, toks, plen, lps, codes in ref[mode]:
            gen = toks[plen:]
            assert len(gen) == GRID[0] * GRID[1] + 1 and gen[-1] == EOM
            assert all(TEXT_V <= t < TEXT_V + IMG_V for t in gen[:-1])
            assert codes == [t - TEXT_V for t in gen[:-1]]
            assert len(lps) == GRID[0] * GRID[1] and max(lps) <= 0
            assert sid == pid * G + (sid % G)
    # Text mode: only text ids; eos stop == the no-eos sample cut after its first eos.
    eos = ref["eos"]
    for full, cut in zip(ref["text_True"], ref["text_eos"]):
        gen = full[2][full[3]:]
        assert all(t < TEXT_V for t in gen)
        want = gen[: gen.index(eos) + 1] if eos in gen else gen
        assert cut[2][cut[3]:] == want
        assert cut[4] == full[4][: len(want)]
    assert any(len(c[2]) < len(f[2]) for f, c in zip(ref["text_True"], ref["text_eos"]))
    # Batch composition does not change a sample.
    assert _tokens(ref["alone"]) == [t for t in _tokens(ref["img_True"]) if t[0] == 1]
    # Training-forward log-probs == rollout log-probs -> first ratio 1.
    assert ref["recompute_diff"] <= 1e-5
    s1 = ref["stats1"]
    assert abs(s1["first_update_ratio_mean"] - 1.0) <= 1e-5
    assert s1["clip_fraction"] == 0.0 and s1["kl"] > 0
    assert abs(s1["entropy"] - ref["direct_entropy"]) <= 1e-5
    # Gradient through megatron-core's schedule == autograd of the formula written in the test.
    assert ref["grad_diff"] <= 1e-5 * max(1.0, ref["grad_scale"])
    s2 = ref["stats2"]
    assert s2["num_updates"] == 4 and s2["updates_ok"]
    assert s2["ratio_mean"] != 1.0  # the policy moved between updates


LAYOUTS = {
    "tp2_pp2": (4, dict(tensor_parallel=2, pipeline_parallel=2)),
    "pp2_vpp2_dp2": (4, dict(pipeline_parallel=2, virtual_pipeline_parallel=2)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_tp1(reference, name):
    root, ref = reference
    world, layout = LAYOUTS[name]
    results = run_ranks(_rank, world, str(root), layout, False)
    for key in ("img_True", "img_False", "cfg_True", "cfg_False"):
        # every rank of a replica holds the same rollouts; the replicas together hold TP=1's
        per_dp = {}
        for r in results:
            per_dp.setdefault(r["dp_rank"], _tokens(r[key]))
            assert _tokens(r[key]) == per_dp[r["dp_rank"]]
        union = sorted(t for v in per_dp.values() for t in v)
        assert union == sorted(_tokens(ref[key])), key
    for r in results:
        assert _tokens(r["text_True"]) == _tokens(ref["text_True"])
        assert r["recompute_diff"] <= 1e-5
        for k in ("stats1", "stats2"):
            for stat in ("loss", "kl", "entropy", "clip_fraction"):
                assert abs(r[k][stat] - ref[k][stat]) <= 1e-5 * max(1.0, abs(ref[k][stat])), (k, stat)
        assert abs(r["stats1"]["grad_norms"][0] - ref["stats1"]["grad_norms"][0]) <= 1e-5 * ref["stats1"]["grad_norms"][0]
