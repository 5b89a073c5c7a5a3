"""One preset vocabulary for every config: `tiny` and `xomni`; the old names are one-line errors."""

import pytest


def test_preset_names_are_tiny_and_xomni():
    from megatron_xomni.models.flux_decoder import decoder_config
    from megatron_xomni.models.siglip_vq import tokenizer_config
    from megatron_xomni.models.xomni import model_preset

    assert model_preset("xomni").hidden_size == 3584 and decoder_config("xomni").adapter_dim == 1536
    assert tokenizer_config("xomni").width == 1536
    with pytest.raises(ValueError, match="`xomni_7b` is now `xomni`"):
        model_preset("xomni_7b")
    with pytest.raises(ValueError, match="`full` is now `xomni`"):
        decoder_config("full")
