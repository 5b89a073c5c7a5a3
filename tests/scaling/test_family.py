"""The one-dial model family: its rules, monotone sizes, layout validation, exact parameters."""

import math

import pytest

from megatron_xomni.models.xomni.flops import param_counts
from megatron_xomni.parallel.layout import LayoutError
from megatron_xomni.scaling.family import DEFAULT_FAMILY, ModelFamily, validate_member
from tests.multirank import run_ranks

DEPTHS = range(1, 33)


def test_sizes_grow_with_depth():
    rows = [DEFAULT_FAMILY.describe(d) for d in DEPTHS]
    for a, b in zip(rows, rows[1:]):
        for k in ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "vision_blocks", "num_layers_total"):
            assert b[k] >= a[k], (k, a, b)
        assert b["params"] > a["params"] and b["non_embedding_params"] > a["non_embedding_params"]
        assert b["lr"] <= a["lr"]  # the rule depends on the width only


def _expected_heads(d, multiple=1):
    """The documented rule, written out: ceil(d/7) KV heads (rounded up to `multiple`), d query
    heads rounded up to a multiple of the KV heads."""
    kv = multiple * math.ceil(math.ceil(d / 7) / multiple)
    return kv * math.ceil(d / kv), kv


def test_rules():
    for d in DEPTHS:
        m = DEFAULT_FAMILY.member(d)
        q, kv = m.num_attention_heads, m.num_query_groups
        assert (q, kv) == _expected_heads(d)
        assert m.num_layers == d and m.kv_channels == 64 and m.hidden_size == 64 * q
        assert q % kv == 0 and q // kv <= 7
        assert 64 * d <= m.hidden_size < 64 * (d + kv)  # aspect ratio 64, up to the rounding
        assert m.ffn_hidden_size % 64 == 0 and 0 <= m.ffn_hidden_size - 8 / 3 * m.hidden_size < 64
        assert m.num_vision_adapter_layers == m.num_vision_head_layers == max(1, round(d / 7 + 1e-9))
        assert DEFAULT_FAMILY.learning_rate(d) == pytest.approx(6e-4 * math.sqrt(768 / m.hidden_size))
    # Qwen2.5's 7:1 GQA where 7 divides the heads; X-Omni-7B's 4 + 4 vision blocks at depth 28
    assert (DEFAULT_FAMILY.member(14).num_query_groups, DEFAULT_FAMILY.member(28).num_query_groups) == (2, 4)
    x = DEFAULT_FAMILY.member(28)
    assert (x.hidden_size, x.num_attention_heads, x.num_vision_adapter_layers, x.num_layers_total) == (1792, 28, 4, 36)
    assert DEFAULT_FAMILY.learning_rate(12) == pytest.approx(6e-4)  # the anchor: hidden 768
    # vocabularies and the rest come from the base preset (and its overrides)
    real = ModelFamily(base_overrides={"text_vocab_size": 152064, "image_vocab_size": 16384,
                                       "image_table_size": 16448}).member(4)
    assert (real.text_vocab_size, real.image_table_size) == (152064, 16448)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_validation_accepts_exactly_the_layouts_that_fit(tp, pp):
    for multiple in sorted({1, tp}):
        family = ModelFamily(kv_heads_multiple=multiple)
        for d in range(1, 17):
            q, kv = _expected_heads(d, multiple)
            layers = d + 2 * max(1, round(d / 7 + 1e-9))
            if q % tp == 0 and kv % tp == 0 and layers % pp == 0:
                m = family.validate_member(d, tp, pp)
                assert m.num_attention_heads % tp == 0 and m.num_query_groups % tp == 0
                assert m.num_layers_total % pp == 0
            else:
                with pytest.raises(LayoutError) as e:
                    family.validate_member(d, tp, pp)
                assert "\n" not in str(e.value) and str(e.value).startswith(f"family member depth={d} ")
        if multiple == tp and pp == 1:  # KV heads a multiple of TP: every depth fits
            assert all(family.validate_member(d, tp) for d in range(1, 17))


def test_invalid_tp_is_refused_in_one_line():
    with pytest.raises(LayoutError) as e:
        validate_member(4, tp=2)  # 4 query heads, 1 KV head
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("family member depth=4 (256 hidden, 4 heads, 1 KV heads, 6 layers) does not fit TP=2")
    assert "num_query_groups (KV heads)=1 is not divisible by tensor_parallel=2" in msg
    assert "ModelFamily(kv_heads_multiple=2)" in msg
    m = validate_member(3, tp=2, family=ModelFamily(kv_heads_multiple=2))  # the named fix works
    assert (m.num_attention_heads, m.num_query_groups) == (4, 2)
    with pytest.raises(LayoutError, match="cannot be split into pipeline_parallel"):
        validate_member(2, pp=3)  # 2 + 1 + 1 layers
    with pytest.raises(LayoutError, match="^family member depth=0 must be a positive integer"):
        validate_member(0)


def _build(rank, world, depths):
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel

    pg = initialize_parallel(ParallelConfig(), seed=0)
    out = {}
    for d in depths:
        (model,) = build_model_chunks(DEFAULT_FAMILY.member(d), ParallelConfig(), pg)
        out[d] = sum(p.numel() for p in model.parameters())
    return out


def test_param_counts_match_built_members():
    (built,) = run_ranks(_build, 1, (1, 3))
    for d, n in built.items():
        assert param_counts(DEFAULT_FAMILY.member(d)).total == n


def test_batch_rule_is_deepseeks_in_whole_micro_batches():
    f = ModelFamily()
    for c in (1e10, 3.3e12, 1e17, 3e20):
        tokens = 0.292 * c**0.3271  # Bi et al. 2024 (DeepSeek LLM), eq. 1
        assert f.batch_tokens(c) == pytest.approx(tokens, rel=1e-12)
        for seq, multiple in ((64, 1), (64, 8), (4096, 16), (16384, 256)):
            gbs = f.global_batch_size(c, seq, multiple)
            assert gbs % multiple == 0 and gbs >= multiple
            assert abs(gbs - tokens / seq) <= multiple / 2 or gbs == multiple
    # 3e20 FLOPs (DeepSeek's largest fitted budget): 1.457e6 tokens = 355.7 sequences of 4096 -> 22 x 16
    assert f.global_batch_size(3e20, 4096, 16) == 352
    assert f.global_batch_size(3e20, 16384, 256) == 256  # 88.9 sequences: at least one multiple
    assert ModelFamily(batch_coeff=1.0, batch_exponent=0.0).global_batch_size(1e20, 1) == 1
    with pytest.raises(ValueError, match="must be positive"):
        f.batch_tokens(0.0)


def test_family_for_a_recipe_model_keeps_its_other_fields():
    from megatron_xomni.models.xomni.config import model_preset
    from megatron_xomni.scaling.family import SIZE_FIELDS, family_for

    base = model_preset("tiny", text_vocab_size=640, rotary_base=5e5, init_method_std=0.01)
    m = family_for(base, aspect_ratio=32, head_dim=16).member(3)
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (3, 96, 6, 1)
    for k, v in base.to_dict().items():
        if k not in SIZE_FIELDS:
            assert getattr(m, k) == v, k
