"""The per-step micro-batch plan of GRPOStep (rl/microbatches.py).

Unit checks of the plan (rows, lengths, contents) need no ranks. The end-to-end check runs one GRPO
step on text rollouts of prompts of 5, 9 and 12 tokens that stop at an EOS (unequal completions),
with two zero-variance groups (dropped rows, zero-weight padding rows and rows no update needs),
kl_beta > 0, 2 ppo epochs and 2 minibatches, once at TP=1 (one rank) and once at PP=2 (two ranks), and
compares the parameters after the step with an independent reference written here: per-row unpadded
forwards of the GRPO formula with autograd (`_direct_grads` of test_rollout_grpo_parallel) and
torch's AdamW, one update per minibatch and epoch. Two launches in all.
"""

import types

import pytest
import torch

from megatron_xomni.inference.generation import Rollout
from megatron_xomni.rl.grpo import loss_weights, microbatch_loss_weights
from megatron_xomni.rl.microbatches import plan_part
from tests.multirank import run_ranks
from tests.rl.test_rollout_grpo_parallel import TEXT_V, _build, _direct_grads, _save_models

pytestmark = pytest.mark.timeout(400)

G, MBS, NEW = 3, 4, 7
BETA, LO, HI, LR = 0.5, 0.2, 0.28, 3e-3
# Adam divides by sqrt(v) + eps: with eps 1e-8 the thousands of weights here whose gradient is ~1e-8
# (the gradients themselves agree to ~3e-8, grad scale 5e-2) would step by ~lr * g / (|g| + eps), which
# turns fp32 rounding of the gradient into ~lr / 10 parameter differences. eps 1e-4 bounds that
# amplification to lr * 3e-8 / 1e-4 ~ 1e-6 while weights with gradients above 1e-4 still take ~lr steps.
EPS = 1e-4
# 8 prompts: minibatch 0 = prompt ids 0, 2, 4, 6 (lengths 5, 9, 5, 9: shorter than the step's longest,
# so PP's part-length packing saves too), minibatch 1 = 1, 3, 5, 7 (lengths 9, 12, 5, 12).
PROMPT_LENGTHS = [5, 9, 9, 12, 5, 5, 9, 12]
FLAT = (2, 4)  # zero-variance groups, both in minibatch 0: 6 kept rows + 2 padding rows, 4 rows unused


def _rollout(pid, sid, plen, n, seed):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, 100, (plen + n,), generator=g)
    return Rollout(prompt_id=pid, sample_id=sid, tokens=toks, prompt_length=plen,
                   logprobs=-torch.rand(n, generator=g))


# ---- the plan alone ------------------------------------------------------------------------------
def test_plan_packs_each_microbatch_to_its_own_length_or_the_parts():
    # (prompt length, sampled tokens): odd lengths, a long row among short ones
    shapes = [(5, 3), (5, 1), (9, 6), (9, 2), (12, 1), (12, 7), (5, 8), (9, 3), (12, 4)]
    rs = [_rollout(i // 3, i, p, n, i) for i, (p, n) in enumerate(shapes)]
    rows = [0, 1, 2, 3, 4, 6, 7, 8]  # row 5 is in no update
    keep = [True, False, True, True, False, True, True, True, True]
    adv = torch.arange(9, dtype=torch.float32) / 10
    by_len = sorted(rows, key=lambda i: (rs[i].tokens.numel(), rs[i].prompt_length, i))
    for one_length in (False, True):
        plan = plan_part(rs, rows, keep, adv, 4, pad_id=0, text_vocab_size=1000, one_length=one_length,
                         device=torch.device("cpu"))
        assert plan.rows == by_len and len(plan.microbatches) == 2
        part_len = max(rs[i].tokens.numel() for i in rows) - 1
        for j, m in enumerate(plan.microbatches):
            idx = by_len[4 * j: 4 * j + 4]
            own = max(rs[i].tokens.numel() for i in idx) - 1
            assert m["tokens"].shape == (4, part_len if one_length else own)
            for k, i in enumerate(idx):
                r, n = rs[i], rs[i].tokens.numel()
                seq = torch.cat([m["tokens"][k, :1], m["labels"][k]])  # inputs and next-token labels: one row
                assert torch.equal(m["tokens"][k], seq[:-1])
                assert torch.equal(seq[:n], r.tokens) and (seq[n:] == 0).all()  # right-padded with pad_id
                s = r.prompt_length - 1
                want = torch.zeros(m["tokens"].shape[1])
                want[s: s + r.num_sampled] = float(keep[i])  # dropped rows only pad: weight 0
                assert torch.equal(m["action_mask"][k], want)
                assert torch.equal(m["old_logprobs"][k, s: s + r.num_sampled], r.logprobs)
                assert m["advantages"][k] == adv[i]
            kept = [rs[i].prompt_length - 1 for i in idx if keep[i]]
            assert m["logits_from"] == min(kept) and m["only_head"] == "text"
        assert plan.real_tokens == sum(rs[i].tokens.numel() - 1 for i in rows)
        assert plan.packed_tokens == sum(m["tokens"].numel() for m in plan.microbatches)
    # own lengths pack fewer positions than the part's longest here
    own = plan_part(rs, rows, keep, adv, 4, pad_id=0, text_vocab_size=1000, one_length=False, device="cpu")
    assert own.packed_tokens < plan.packed_tokens


def test_microbatch_loss_weights_are_those_of_the_whole_minibatch():
    g = torch.Generator().manual_seed(0)
    masks = [(torch.rand(3, s, generator=g) > 0.4).float() for s in (4, 9, 6)]
    masks[1][2] = 0.0  # a row that scores nothing
    for agg in ("sequence", "token"):
        got = microbatch_loss_weights(masks, agg)
        n_tok = sum(m.sum() for m in masks)
        n_seq = sum(int((m.sum(1) > 0).sum()) for m in masks)
        for w, m in zip(got, masks):
            assert w.shape == m.shape
            per_seq = m.sum(1, keepdim=True).clamp(min=1)
            want = m / n_tok if agg == "token" else m / per_seq / n_seq
            assert torch.allclose(w, want, rtol=1e-6, atol=0)
    # equal lengths: the same as loss_weights of the stacked minibatch
    same = [m[:, :4] for m in masks]
    assert torch.equal(torch.cat(microbatch_loss_weights(same, "token")), loss_weights(torch.cat(same), "token"))


# ---- one GRPO step against the formula --------------------------------------------------------------
def _prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(10, TEXT_V, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _reward(r) -> float:
    return 0.5 if r.prompt_id in FLAT else ((r.sample_id * 37) % 11) / 10.0


def _pack(rs):
    return [(r.prompt_id, r.sample_id, r.tokens.tolist(), r.prompt_length, r.logprobs.tolist()) for r in rs]


def _unpack(packed):
    return [Rollout(prompt_id=p, sample_id=s, tokens=torch.tensor(t), prompt_length=n, logprobs=torch.tensor(lp))
            for p, s, t, n, lp in packed]


def _full_params(chunks):
    """(key, global shape, global offset, prepend axes, local tensor) of every weight shard of this rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron_xomni.training.step import model_sharded_state_dict

    out = []
    for sd in model_sharded_state_dict(chunks).values():
        for sh in sd.values():
            if isinstance(sh, ShardedTensor) and sh.data is not None:
                out.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.prepend_axis_num,
                            sh.data.detach().clone()))
    return out


def _assemble(per_rank):
    full = {}
    for shards in per_rank:
        for key, shape, offset, prepend, data in shards:
            t = full.setdefault(key, torch.full(shape, float("nan")))
            local = (1,) * prepend + tuple(data.shape)
            t[tuple(slice(o, o + n) for o, n in zip(offset, local))] = data.reshape(local)
    return full


def _instrumented_step(step):
    """Record the plan, every reference forward and every update's micro-batches of `step`."""
    import megatron_xomni.rl.grpo as grpo

    seen = {"plans": [], "ref_calls": [], "updates": []}
    real_plan, real_ref, real_update = grpo.plan_part, grpo.compute_logprobs, step._update

    def plan(*a, **k):
        seen["plans"].append(real_plan(*a, **k))
        return seen["plans"][-1]

    def ref(chunks, pg, mbs, *a, **k):
        seen["ref_calls"].append([id(m) for m in mbs])
        return real_ref(chunks, pg, mbs, *a, **k)

    def update(mbs):
        seen["updates"].append([id(m) for m in mbs])
        return real_update(mbs)

    grpo.plan_part, grpo.compute_logprobs, step._update = plan, ref, update
    return seen


def _summary(seen):
    plans = [{"rows": p.rows, "lengths": [m["tokens"].shape[1] for m in p.microbatches],
              "ids": [id(m) for m in p.microbatches]} for p in seen["plans"]]
    return {"plans": plans, "ref_calls": seen["ref_calls"], "updates": seen["updates"]}


def _run_step(rank, world, root, layout, packed):
    from megatron_xomni.inference.generation import RolloutConfig, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer

    res = {}
    if packed is None:  # the TP=1 launch: models and rollouts are made here
        _save_models(root)
        pg, policy, ref = _build(rank, world, layout, root)
        cfg = RolloutConfig(sampling=SamplingConfig(temperature=1.0, min_p=0.03), samples_per_prompt=G, seed=5)
        ids = list(range(len(PROMPT_LENGTHS)))
        probe = generate_text(policy, pg, _prompts(), NEW, None, cfg, prompt_ids=ids)
        # EOS: the token whose first occurrences cut the completions at the most different lengths
        def cut(t):
            return {int((r.tokens[r.prompt_length:] == t).nonzero()[0, 0]) if (r.tokens[r.prompt_length:] == t).any()
                    else NEW for r in probe}
        eos = max(range(TEXT_V), key=lambda t: (len(cut(t)), -t))
        packed = _pack(generate_text(policy, pg, _prompts(), NEW, eos, cfg, prompt_ids=ids))
        res["rollouts"] = packed
    else:
        pg, policy, ref = _build(rank, world, layout, root)
    rollouts = _unpack(packed)
    rewards = [_reward(r) for r in rollouts]
    wrapped, opt = wrap_and_build_optimizer(policy, OptimConfig(lr=LR, clip_grad=1e9, weight_decay=0.0, adam_eps=EPS), pg)
    before = _full_params(wrapped)
    step = GRPOStep(wrapped, opt, pg, GRPOConfig(clip_eps_low=LO, clip_eps_high=HI, kl_beta=BETA, ppo_epochs=2,
                                                   num_minibatches=2, micro_batch_size=MBS), ref_chunks=ref)
    seen = _instrumented_step(step)
    res["stats"] = step(rollouts, rewards)
    res["seen"] = _summary(seen)
    res["params"], res["before"] = _full_params(wrapped), before
    if world == 1:  # the independent reference: a fresh copy of the policy, per-row forwards, AdamW
        _, ref_policy, ref_model = _build(rank, world, layout, root)
        model = ref_policy[0]
        adam = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
        as_wrapped = [types.SimpleNamespace(module=model)]
        for _ in range(2):
            for u in range(2):
                kept = [r for r in rollouts if r.prompt_id % 2 == u and r.prompt_id not in FLAT]
                grads, _ = _direct_grads(as_wrapped, ref_model, kept, [_reward(r) for r in kept], BETA, LO, HI)
                for n, p in model.named_parameters():
                    p.grad = grads[n]
                adam.step()
        res["reference"] = _full_params(ref_policy)
    return res


def test_grpo_step_with_the_plan_matches_the_formula_at_tp1_and_pp2(tmp_path):
    (one,) = run_ranks(_run_step, 1, str(tmp_path), {}, None)
    pp2 = run_ranks(_run_step, 2, str(tmp_path), {"pipeline_parallel": 2}, one["rollouts"])
    rollouts = _unpack(one["rollouts"])
    lengths = {r.tokens.numel() for r in rollouts}
    assert {r.prompt_length for r in rollouts} == {5, 9, 12} and len({r.num_sampled for r in rollouts}) >= 3

    reference, before = _assemble([one["reference"]]), _assemble([one["before"]])
    moved = max((reference[k] - before[k]).abs().max().item() for k in reference)
    for name, params in (("tp1", _assemble([one["params"]])), ("pp2", _assemble([r["params"] for r in pp2]))):
        assert params.keys() == reference.keys() and not any(t.isnan().any() for t in params.values())
        diff = max((params[k] - reference[k]).abs().max().item() for k in reference)
        # fp32, 4 Adam steps of lr 3e-3: measured 7e-8 at TP=1 and PP=2 (1.2e-7 / 2.2e-7 with other
        # prompt lengths), while the weights moved by up to 1.2e-2
        assert diff <= 5e-7, (name, diff)
    assert moved > 1e4 * 5e-7

    # The plan: part 0 forwards its 6 kept rows + 2 padding rows (2 micro-batches), part 1 its 12 rows (3).
    by_part = [[i for i, r in enumerate(rollouts) if r.prompt_id % 2 == u] for u in range(2)]
    for res, one_length in ((one, False), *((r, True) for r in pp2)):
        seen = res["seen"]
        assert len(seen["plans"]) == 2
        for u, plan in enumerate(seen["plans"]):
            rows = by_part[u]
            kept = [i for i in rows if rollouts[i].prompt_id not in FLAT]
            used = sorted(kept + [i for i in rows if i not in kept][: (-len(kept)) % MBS])
            assert sorted(plan["rows"]) == used and len(plan["rows"]) == (8, 12)[u]
            assert plan["rows"] == sorted(used, key=lambda i: (rollouts[i].tokens.numel(), rollouts[i].prompt_length, i))
            part_len = max(rollouts[i].tokens.numel() for i in used) - 1
            for j, n in enumerate(plan["lengths"]):
                own = max(rollouts[i].tokens.numel() for i in plan["rows"][j * MBS:(j + 1) * MBS]) - 1
                assert n == (part_len if one_length else own)
        # one reference forward per part, on the very micro-batches every update of both epochs reuses
        ids = [p["ids"] for p in seen["plans"]]
        assert seen["ref_calls"] == ids and seen["updates"] == ids + ids
        stats = res["stats"]
        assert stats["num_updates"] == 4 and stats["updates_ok"] and stats["dropped_groups"] == 2
        packed = sum(len(p["rows"]) // len(p["lengths"]) * sum(p["lengths"]) for p in seen["plans"])
        real = sum(rollouts[i].tokens.numel() - 1 for p in seen["plans"] for i in p["rows"])
        assert stats["packed_tokens"] == packed
        assert abs(stats["padded_token_share"] - (1 - real / packed)) <= 1e-12
        whole = 20 * (max(lengths) - 1)
        assert abs(stats["padding_saved_share"] - (1 - packed / whole)) <= 1e-12
    assert one["stats"]["packed_tokens"] < pp2[0]["stats"]["packed_tokens"] < 20 * (max(lengths) - 1)
    for k in ("loss", "kl", "entropy", "clip_fraction", "ratio_mean"):
        assert abs(pp2[0]["stats"][k] - one["stats"][k]) <= 1e-5 * max(1.0, abs(one["stats"][k])), k
