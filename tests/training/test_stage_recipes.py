"""The stage recipes validate without their inputs (what `xomni submit --dry-run` relies on) and refuse
missing local inputs in one line when the job starts (check_paths -> InputError, exit 2)."""

import pytest

from megatron_xomni.recipes import load_recipe
from megatron_xomni.training.run import InputError

# recipe -> world size it is validated for (the X-Omni SigLIP-VQ run: 32 nodes x 8 GPUs)
WORLDS = {"tiny_siglip_vq": 2, "tiny_siglip_contrastive": 2, "xomni_siglip_vq": 256, "tiny_tokenize": 1, "xomni_tokenize": 1,
          "tiny_text_tokenizer": 1, "xomni_text_tokenizer": 1}


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_recipe_validates_without_paths_and_refuses_missing_inputs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative input paths do not exist here
    cfg = load_recipe(name)
    cfg.validate(WORLDS[name])
    if name == "tiny_text_tokenizer":  # built from the built-in world: no input path
        cfg.check_paths()
        return
    with pytest.raises(InputError) as err:
        cfg.check_paths()
    assert "\n" not in str(err.value) and "=" in str(err.value)  # one line naming the setting


def test_one_process_stages_refuse_torchrun():
    for name in ("tiny_tokenize", "tiny_text_tokenizer"):
        cfg = load_recipe(name)
        assert not cfg.DISTRIBUTED
        with pytest.raises(ValueError, match="without torchrun"):
            cfg.validate(2)
    with pytest.raises(ValueError, match="data.batch_size=256 is not a multiple of the 24 ranks"):
        load_recipe("xomni_siglip_vq").validate(24)
