"""FLOP and parameter counts against torch's FlopCounterMode and the built model.

One gloo rank builds the tiny model (and an odd-sized variant with unequal vision blocks), runs
a forward+backward of the training loss on a text-only and a mixed text+image batch under
FlopCounterMode, and reports the measured matmul FLOPs (total and per module) and parameters.

On CPU, SDPA runs `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode has no
formula for (it would count 0); the test maps it, and its backward, to torch's own SDPA formulas
(`sdpa_flop_count` / `sdpa_backward_flop_count`, the ones FlopCounterMode applies to the CUDA
flash, memory-efficient and cuDNN kernels).
"""

import pytest

from tests.multirank import run_ranks

SEQ, BATCH, TEXT_V = 37, 3, 512
VARIANT = dict(hidden_size=96, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=160,
               num_layers=3, num_vision_adapter_layers=2, num_vision_head_layers=1)


def _batches():
    import torch

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, TEXT_V, (BATCH, SEQ + 1), generator=g)
    image = TEXT_V + torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)
    mixed = torch.where((torch.arange(SEQ + 1) % 10) >= 3, image, text)  # 7 of 10 positions image
    return {"text": text, "mixed": mixed}


def _measure(rank, world):
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    pg = initialize_parallel(ParallelConfig(), seed=0)
    out = {}
    for name, overrides in (("tiny", {}), ("variant", VARIANT)):
        cfg = model_preset("tiny", **overrides)
        (model,) = build_model_chunks(cfg, ParallelConfig(), pg)
        res = {"params": sum(p.numel() for p in model.parameters()),
               "embedding": sum(p.numel() for n, p in model.named_parameters()
                                if n in ("embedding.word_embeddings.weight",
                                         "image_embedding.word_embeddings.weight"))}
        for kind, ids in _batches().items():
            pos = torch.arange(SEQ).expand(BATCH, SEQ)
            with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:])
                forward = counter.get_total_flops()
                forward_modules = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
                loss.float().mean().backward()
            model.zero_grad(set_to_none=True)
            res[kind] = {"forward": forward, "total": counter.get_total_flops(),
                         "modules": forward_modules,
                         "image_positions": int((ids[0, :-1] >= TEXT_V).sum())}
        out[name] = (cfg.to_dict(), res)
    return out


@pytest.fixture(scope="module")
def measured():
    (result,) = run_ranks(_measure, 1)
    return result


def _cfg(d):
    from megatron_xomni.models.xomni import XOmniModelConfig

    return XOmniModelConfig.from_dict(d)


@pytest.mark.parametrize("name", ["tiny", "variant"])
@pytest.mark.parametrize("kind", ["text", "mixed"])
def test_executed_flops_match_flop_counter(measured, name, kind):
    from megatron_xomni.models.xomni.flops import executed_flops

    cfg_dict, res = measured[name]
    flops = executed_flops(_cfg(cfg_dict), SEQ, BATCH)
    got = res[kind]
    assert got["forward"] > 0
    assert flops.forward == pytest.approx(got["forward"], rel=0.01)
    assert flops.total == pytest.approx(got["total"], rel=0.01)


def _head_flops(modules, head):
    (key,) = [k for k in modules if k.endswith(head)]
    return modules[key]


@pytest.mark.parametrize("name", ["tiny", "variant"])
@pytest.mark.parametrize("kind", ["text", "mixed"])
def test_model_flops_are_the_measured_ones_with_one_head_per_position(measured, name, kind):
    """Model FLOPs (non-causal) = 3 x (measured forward minus, at each position, the head of the
    other modality); the causal count drops exactly the s(s-1)/2 masked pairs per layer."""
    from megatron_xomni.models.xomni.flops import model_flops

    cfg_dict, res = measured[name]
    cfg, got = _cfg(cfg_dict), res[kind]
    frac_img = got["image_positions"] / SEQ
    text_head = _head_flops(got["modules"], ".output_layer")
    image_head = _head_flops(got["modules"], ".image_output_layer")
    unused = frac_img * text_head + (1.0 - frac_img) * image_head
    full = model_flops(cfg, SEQ, got["image_positions"], BATCH, causal=False)
    assert full == pytest.approx(3.0 * (got["forward"] - unused), rel=1e-9)
    causal = model_flops(cfg, SEQ, got["image_positions"], BATCH, causal=True)
    masked_pairs = SEQ * (SEQ - 1) / 2
    per_pair = 3 * 2 * 2 * cfg.num_attention_heads * cfg.kv_channels * cfg.num_layers_total
    assert full - causal == pytest.approx(BATCH * masked_pairs * per_pair, rel=1e-9)


@pytest.mark.parametrize("name", ["tiny", "variant"])
def test_param_counts_match_the_built_model(measured, name):
    from megatron_xomni.models.xomni.flops import param_counts

    cfg_dict, res = measured[name]
    counts = param_counts(_cfg(cfg_dict))
    assert counts.total == res["params"]
    assert counts.non_embedding == res["params"] - res["embedding"]


def test_bad_arguments_are_refused():
    from megatron_xomni.models.xomni import model_preset
    from megatron_xomni.models.xomni.flops import model_flops, model_flops_per_token

    cfg = model_preset("tiny")
    with pytest.raises(ValueError, match="image_positions=40 must be in"):
        model_flops(cfg, 32, image_positions=40)
    with pytest.raises(ValueError, match="image_fraction=1.5"):
        model_flops_per_token(cfg, 32, image_fraction=1.5)
