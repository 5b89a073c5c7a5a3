"""The fast decode path (inference/decode.py) against the megatron-core reference path, on real gloo ranks.

Every launch builds the tiny model (vision blocks included) at one layout and generates each
case twice on the same parameters: `RolloutConfig(fast=True)` and `fast=False` (megatron-core's
forward with a StaticInferenceContext). Tokens must be identical and log-probs within 1e-5.
The fast path runs once more with the C kernels switched off (its library route), and, without
pipeline stages, once more with fixed-shape steps (`decode_steps="static"`, the eager form of the
CUDA-graph step). Each launch then takes a GRPO step (optimizer.step updates
the parameters in place) and checks that both paths see the new weights. Three launches: TP1 (it
also writes the checkpoint the other layouts load), TP2, PP2.
"""

import pytest
import torch

from megatron_xomni.device import torch_threads
from tests.multirank import run_ranks

pytestmark = pytest.mark.timeout(400)

TEXT_V, IMG_V = 512, 256
SOM, IMAGE_TOK, EOM = 3, 6, 4
GRID = (3, 5)  # odd sizes: 15 codes per image
PREFIX = [SOM, 10 + GRID[0], 10 + GRID[1], IMAGE_TOK]
# Two prompt lengths (two generation buckets), three prompts: rows of 3 per forward give odd batches.
IMAGE_PROMPTS = [[101, 102, 103] + PREFIX, [201, 202, 203, 204, 205, 206] + PREFIX, [301, 302, 303] + PREFIX]
# Understanding-style prompts with image tokens inside (mixed prefill through the vision blocks).
TEXT_PROMPTS = [[21, TEXT_V + 5, TEXT_V + 9, 22, 23], [31, TEXT_V + 7, 32], [41, 42, 43, 44, 45]]


def _init_weights(model) -> None:
    """Random weights with peaked output distributions; norm weights near 1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def _pack(rollouts):
    return [(r.sample_id, r.tokens.tolist(), r.logprobs.tolist()) for r in rollouts]


def _cases(chunks, pg, fast: bool, decode_steps: str = "dynamic") -> dict:
    from megatron_xomni.inference.generation import RolloutConfig, generate_images, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig

    minp = SamplingConfig(temperature=1.0, min_p=0.03)
    mixed = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, min_p=0.03)
    ids = list(range(len(IMAGE_PROMPTS)))

    def cfg(sampling, **kw):
        return RolloutConfig(sampling=sampling, samples_per_prompt=2, max_rows_per_forward=3, fast=fast,
                             decode_steps=decode_steps, **kw)

    out = {
        "image": generate_images(chunks, pg, IMAGE_PROMPTS, GRID, EOM, cfg(minp, seed=42), prompt_ids=ids),
        "image_cfg": generate_images(chunks, pg, IMAGE_PROMPTS, GRID, EOM, cfg(mixed, seed=7, cfg_scale=3.0),
                                     prompt_ids=ids, uncond_prompt=PREFIX),
        "image_greedy_cfg": generate_images(chunks, pg, IMAGE_PROMPTS, GRID, EOM,
                                            cfg(SamplingConfig(temperature=0.0), cfg_scale=2.0),
                                            prompt_ids=ids, uncond_prompt=PREFIX),
        "text": generate_text(chunks, pg, TEXT_PROMPTS, 7, None, cfg(minp, seed=3), prompt_ids=ids),
        "text_greedy": generate_text(chunks, pg, TEXT_PROMPTS, 7, None, cfg(SamplingConfig(temperature=0.0)),
                                     prompt_ids=ids),
    }
    # Early stop: the eos is a token the first sample draws mid-sequence.
    eos = out["text"][0].tokens[len(TEXT_PROMPTS[0]) + 2].item()
    out["text_eos"] = generate_text(chunks, pg, TEXT_PROMPTS, 7, eos, cfg(minp, seed=3), prompt_ids=ids)
    return {k: _pack(v) for k, v in out.items()}


def _grpo_step_and_regenerate(chunks, pg) -> dict:
    """Fast rollouts before a GRPO step, then both paths after it on the wrapped (DDP) chunks."""
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep
    from megatron_xomni.inference.generation import RolloutConfig, generate_images
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer

    def roll(models, fast):
        cfg = RolloutConfig(sampling=SamplingConfig(temperature=1.0, min_p=0.03), samples_per_prompt=2,
                            seed=11, fast=fast)
        return generate_images(models, pg, IMAGE_PROMPTS, GRID, EOM, cfg, prompt_ids=[0, 1, 2])

    before = roll(chunks, True)
    # The distributed optimizer moves every parameter's storage into its buffer at wrap time.
    wrapped, opt = wrap_and_build_optimizer(
        chunks, OptimConfig(lr=3e-2, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=True), pg)
    step = GRPOStep(wrapped, opt, pg, GRPOConfig(kl_beta=0.0, micro_batch_size=1))
    stats = step(before, [((r.sample_id * 37) % 11) / 10.0 for r in before])
    return {"before": _pack(before), "after_fast": _pack(roll(wrapped, True)),
            "after_ref": _pack(roll(wrapped, False)), "updates_ok": stats["updates_ok"]}


def _layout_rank(rank, world, root, layout):
    from megatron_xomni.checkpointing import load_checkpoint, resolve_checkpoint, save_checkpoint
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    par = ParallelConfig(**layout)
    pg = initialize_parallel(par, seed=5)
    chunks = build_model_chunks(model_preset("tiny"), par, pg)
    if not layout:  # the TP1 launch creates the weights every layout uses
        _init_weights(chunks[0])
        save_checkpoint(f"{root}/policy", 0, model_sharded_state_dict(chunks), {})
    else:
        load_model_state(chunks, load_checkpoint(resolve_checkpoint(f"{root}/policy"),
                                                 model_sharded_state_dict(chunks)))
    from megatron_xomni.kernels import build

    res = {"fast": _cases(chunks, pg, True), "ref": _cases(chunks, pg, False)}
    with build.disabled():  # the fast path's library route (tensor-op RoPE, SDPA, oneDNN / MKL)
        res["fast_no_kernels"] = _cases(chunks, pg, True)
    if par.pipeline_parallel == 1:  # fixed-shape steps (the CUDA-graph step's eager form) run one stage
        res["static"] = _cases(chunks, pg, True, decode_steps="static")
    res["refusals"] = _refusals(chunks, pg)
    res.update(_grpo_step_and_regenerate(chunks, pg))
    return res


def _refusals(chunks, pg) -> list:
    """The one-line errors for step kinds this layout / device cannot run (None: accepted)."""
    from megatron_xomni.inference.decode import DecodeEngine

    out = []
    for steps in ("static", "cuda_graph", "graphs"):
        try:
            DecodeEngine(chunks, pg, steps=steps)
            out.append(None)
        except ValueError as e:
            out.append(str(e))
    return out


def _assert_same(fast, ref, what):
    assert [(s, t) for s, t, _ in fast] == [(s, t) for s, t, _ in ref], f"{what}: tokens differ"
    diff = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for (_, _, a), (_, _, b) in zip(fast, ref))
    assert diff <= 1e-5, f"{what}: log-probs differ by {diff:.2e}"


def _check_layout(results):
    for res in results:
        for case in res["ref"]:
            _assert_same(res["fast"][case], res["ref"][case], case)
            _assert_same(res["fast_no_kernels"][case], res["ref"][case], f"{case}, kernels off")
            if "static" in res:
                _assert_same(res["static"][case], res["ref"][case], f"{case}, fixed-shape steps")
        static, graph, unknown = res["refusals"]
        assert "expected one of dynamic, static, cuda_graph" in unknown
        assert "needs the model on a CUDA device" in graph or "one pipeline stage" in graph
        assert (static is None) == ("static" in res), static
        _assert_same(res["after_fast"], res["after_ref"], "after the GRPO step")
        assert res["updates_ok"]
        # The rollout after the step samples from the updated policy, not a stale copy.
        moved = max(abs(a - b) for (_, _, la), (_, _, lb) in zip(res["before"], res["after_fast"])
                    for a, b in zip(la, lb))
        assert moved > 1e-2, f"log-probs moved by only {moved:.1e} after the step"
    for res in results[1:]:  # every rank of the replica holds the same rollouts
        assert res["fast"] == results[0]["fast"]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    (res,) = run_ranks(_layout_rank, 1, str(root), {})
    return root, res


def test_tp1_fast_equals_reference(tp1):
    _, res = tp1
    _check_layout([res])
    fast = res["fast"]
    # Non-degenerate cases: guidance changes samples; sampling differs across the samples of a prompt;
    # image rollouts are exactly the grid of codes plus <EOM>.
    assert [t for _, t, _ in fast["image_cfg"]] != [t for _, t, _ in fast["image"]]
    assert fast["image"][0][1] != fast["image"][1][1]
    for _, toks, lps in fast["image"] + fast["image_cfg"]:
        gen = toks[-(GRID[0] * GRID[1] + 1):]
        assert gen[-1] == EOM and all(TEXT_V <= t < TEXT_V + IMG_V for t in gen[:-1])
        assert len(lps) == GRID[0] * GRID[1]
    assert any(len(c[1]) < len(f[1]) for f, c in zip(fast["text"], fast["text_eos"])), "no sample stopped early"


@pytest.mark.parametrize("name,world,layout", [
    ("tp2", 2, dict(tensor_parallel=2)),
    ("pp2", 2, dict(pipeline_parallel=2)),
])
def test_layout_fast_equals_reference(tp1, name, world, layout):
    root, ref = tp1
    results = run_ranks(_layout_rank, world, str(root), layout)
    _check_layout(results)
    # The same rollouts as at TP1 (greedy ones and sampled ones alike).
    for case in ("image", "image_cfg", "text", "text_greedy"):
        assert [(s, t) for s, t, _ in results[0]["fast"][case]] == [(s, t) for s, t, _ in ref["fast"][case]], case


@pytest.mark.parametrize("threads", [1, 2])  # one thread: kernels.small_gemm takes rows <= 32
@pytest.mark.parametrize("rows,fan_in,fan_out,bias", [
    (3, 64, 48, True),      # tiny product: F.linear (2 threads)
    (8, 256, 4096, False),  # oneDNN, weight as its weights operand (2 threads)
    (16, 512, 1024, True),  # oneDNN with the operands swapped (2 threads); the broadcast kernel (1)
    (16, 1024, 512, False),
    (32, 512, 1024, True),  # CFG's doubled rows at batch 16: oneDNN swapped (2 threads); the broadcast kernel (1)
    (48, 256, 1024, False),  # a larger decode batch: oneDNN swapped either way
    (256, 256, 1024, True),  # prompt prefill: oneDNN, weight as its weights operand
])
def test_linear_matches_float64_reference(rows, fan_in, fan_out, bias, threads):
    from megatron_xomni.inference.decode import linear

    g = torch.Generator().manual_seed(rows + fan_in)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
    b = torch.randn(fan_out, generator=g) if bias else None
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    with torch_threads(threads):
        got = linear(x, w, b)
    assert got.shape == (rows, fan_out) and got.is_contiguous()
    # Outputs ~N(0, 1); fp32 accumulation errs by 0.4-3.5e-6 here (torch's F.linear: up to 1.4e-6).
    assert (got.double() - want).abs().max().item() <= 1e-5


def test_supports_only_the_local_spec():
    from types import SimpleNamespace

    from megatron_xomni.inference.decode import DecodeEngine
    from megatron_xomni.models.xomni.norm import RMSNorm

    def model(norm, gated=True):
        layer = SimpleNamespace(input_layernorm=norm, pre_mlp_layernorm=norm,
                                config=SimpleNamespace(gated_linear_unit=gated))
        return SimpleNamespace(decoder=SimpleNamespace(layers=[layer]))

    rms = RMSNorm(SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False), 8)
    assert DecodeEngine.supports([model(rms)])
    # Transformer Engine's spec: the norm is fused into linear_qkv, the layer's own norm is an identity.
    assert not DecodeEngine.supports([model(torch.nn.Identity())])
    assert not DecodeEngine.supports([model(rms, gated=False)])
