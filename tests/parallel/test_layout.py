"""Every invalid layout is refused before any process group starts, with a one-line fix."""

import pytest

from megatron_xomni.models.xomni import model_preset
from megatron_xomni.parallel import LayoutError, ParallelConfig

M7B = model_preset("xomni")  # 28 heads, 4 KV heads, 28 + 8 layers


def _validate(par, world, seq=16384, have_te=False, mb=None):
    par.validate(world, num_attention_heads=M7B.num_attention_heads, num_query_groups=M7B.num_query_groups,
                 num_layers_total=M7B.num_layers_total, seq_length=seq,
                 vocab_sizes={"text_vocab_size": M7B.text_vocab_size, "image_table_size": M7B.image_table_size},
                 have_te_attention=have_te, num_microbatches=mb)


@pytest.mark.parametrize("par,world,kwargs,needle", [
    (ParallelConfig(tensor_parallel=4), 6, {}, "world size 6 is not divisible by TP*PP*CP"),
    (ParallelConfig(tensor_parallel=8), 8, {}, "num_attention_heads=28 is not divisible"),
    (ParallelConfig(tensor_parallel=7), 7, {}, "num_query_groups (KV heads)=4 is not divisible"),
    (ParallelConfig(pipeline_parallel=5), 5, {}, "36 transformer layers"),
    (ParallelConfig(pipeline_parallel=4, virtual_pipeline_parallel=2), 4, {}, "8 equal chunks"),
    (ParallelConfig(pipeline_parallel=1, virtual_pipeline_parallel=2), 1, {}, "needs pipeline_parallel >= 2"),
    (ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2), 2, {"mb": 3}, "multiple of pipeline_parallel"),
    (ParallelConfig(sequence_parallel=True), 1, {}, "needs tensor_parallel >= 2"),
    (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 2, {"seq": 1001}, "seq_length (1001) divisible"),
    (ParallelConfig(context_parallel=2), 2, {}, "needs Transformer Engine"),
    (ParallelConfig(context_parallel=2), 2, {"have_te": True, "seq": 1002}, "divisible by 2*context_parallel"),
])
def test_layout_errors(par, world, kwargs, needle):
    with pytest.raises(LayoutError) as e:
        _validate(par, world, **kwargs)
    assert needle in str(e.value)
    assert "\n" not in str(e.value) and (":" in str(e.value))  # one line: problem: fix


def test_vocab_padding_error_names_the_padded_size():
    par = ParallelConfig(tensor_parallel=2)
    with pytest.raises(LayoutError, match=r"pad the table to a multiple of 2 \(e.g. 768\)"):
        par.validate(2, num_attention_heads=4, num_query_groups=2, num_layers_total=4, vocab_sizes={"text_vocab_size": 641})


def test_valid_7b_layouts_and_derived_dp():
    for par, world in [(ParallelConfig(tensor_parallel=4, pipeline_parallel=2), 64),
                       (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 8),
                       (ParallelConfig(tensor_parallel=4, context_parallel=2), 16)]:
        _validate(par, world, have_te=True)
    assert ParallelConfig(tensor_parallel=4, pipeline_parallel=2).data_parallel(64) == 8


def test_validate_for_checks_what_every_stage_needs():
    """The one entry point: heads, KV heads, layers, both vocabulary tables, SP/CP rules, decoding."""
    from dataclasses import replace

    m = replace(M7B, image_table_size=16449)  # odd image table: the check GRPO used to skip
    with pytest.raises(LayoutError, match=r"model.image_table_size=16449 is not divisible by tensor_parallel=2"):
        ParallelConfig(tensor_parallel=2).validate_for(m, 2)
    with pytest.raises(LayoutError, match=r"model.text_vocab_size=641 is not divisible"):
        ParallelConfig(tensor_parallel=2).validate_for(replace(M7B, text_vocab_size=641), 2)
    with pytest.raises(LayoutError, match="num_attention_heads=28 is not divisible by tensor_parallel=8"):
        ParallelConfig(tensor_parallel=8).validate_for(M7B, 8)
    with pytest.raises(LayoutError, match="multiple of pipeline_parallel"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2).validate_for(M7B, 2, num_microbatches=3)
    with pytest.raises(LayoutError, match=r"seq_length \(1001\) divisible"):
        ParallelConfig(tensor_parallel=2, sequence_parallel=True).validate_for(M7B, 2, seq_length=1001)
    with pytest.raises(LayoutError, match="needs Transformer Engine"):
        ParallelConfig(context_parallel=2).validate_for(M7B, 2)
    sp = ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    sp.validate_for(M7B, 2, seq_length=1024)  # training may split the sequence ...
    with pytest.raises(LayoutError, match="set parallel.sequence_parallel=False"):
        sp.validate_for(M7B, 2, decoding=True)  # ... generation cannot
    cp = ParallelConfig(context_parallel=2)
    cp.validate_for(M7B, 2, have_te_attention=True)  # nor split it over CP ranks
    with pytest.raises(LayoutError, match=r"set parallel.context_parallel=1 \(not 2\)"):
        cp.validate_for(M7B, 2, have_te_attention=True, decoding=True)
    ParallelConfig(tensor_parallel=4, pipeline_parallel=2).validate_for(M7B, 16, decoding=True)
