"""The SigLIP encoder matches transformers' own forward on checkpoints transformers wrote."""
import pytest
import torch
from transformers import (
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from megatron_xomni.models.siglip_vq import SiglipViTEncoder, config_from_hf, resize_position_grid, tokenizer_config

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=16)
SMALL_VQ = dict(codebook_size=16, codebook_dim=8, adapter_dim=16, adapter_num_groups=4)
TOL = 1e-4


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    model = SiglipVisionModel(SiglipVisionConfig(image_size=64, **TINY)).eval()
    # Random init leaves biases/LN at 0/1; perturb them so the parity check covers every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return path, model


def _hf_prenorm(model, pixels, **kw):
    with torch.no_grad():
        return model(pixels, output_hidden_states=True, **kw).hidden_states[-1]


def _ours(path, **overrides):
    enc = SiglipViTEncoder(config_from_hf(path, **SMALL_VQ, **overrides)).eval()
    enc.load_hf_weights(path)
    return enc


def test_native_grid_matches_transformers(siglip_dir):
    path, model = siglip_dir
    enc = _ours(path)
    assert enc.cfg.pos_grid == 4 and enc.cfg.pos_resize_mode == "bicubic"
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ref = _hf_prenorm(model, pixels)
    with torch.no_grad():
        out, grid = enc(pixels)
    assert grid == (4, 4)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    # The features are the pre-post_layernorm ones: the final norm of ours equals HF's last_hidden_state.
    with torch.no_grad():
        last = model(pixels).last_hidden_state
    torch.testing.assert_close(model.post_layernorm(out), last, atol=TOL, rtol=0)


@pytest.mark.parametrize("size", [(96, 128), (32, 48), (48, 48)])
def test_resized_grid_matches_transformers_bicubic(siglip_dir, size):
    path, model = siglip_dir
    enc = _ours(path, pos_resize_mode="bicubic")
    pixels = torch.rand(1, 3, *size) * 2 - 1
    ref = _hf_prenorm(model, pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        out, grid = enc(pixels)
    assert grid == (size[0] // 16, size[1] // 16)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_bilinear_mode_differs_from_bicubic(siglip_dir):
    # X-Omni's bilinear resize is a different function: guards against the mode being ignored.
    path, model = siglip_dir
    enc = _ours(path, pos_resize_mode="bilinear")
    pixels = torch.rand(1, 3, 96, 128) * 2 - 1
    ref = _hf_prenorm(model, pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        out, _ = enc(pixels)
    assert (out - ref).abs().max() > 1e-3
    table = model.embeddings.position_embedding.weight.detach()
    grid = table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 8), mode="bilinear", align_corners=False)
    got = resize_position_grid(table, 4, (6, 8), "bilinear")
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(48, -1))


def test_full_siglip_model_checkpoint(tmp_path):
    torch.manual_seed(1)
    cfg = SiglipConfig(
        text_config=SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=50).to_dict(),
        vision_config=SiglipVisionConfig(image_size=48, **TINY).to_dict(),
    )
    model = SiglipModel(cfg).eval()
    model.save_pretrained(tmp_path)
    enc = _ours(tmp_path)
    assert enc.cfg.pos_grid == 3
    pixels = torch.rand(1, 3, 80, 64) * 2 - 1
    ref = _hf_prenorm(model.vision_model, pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        out, _ = enc(pixels)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def _patchify(pixels, p):
    # SigLIP2's processor layout: each patch flattened as (row, col, channel).
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


@pytest.mark.parametrize("size", [(48, 80), (128, 96)])
def test_siglip2_naflex_checkpoint(tmp_path, size):
    torch.manual_seed(2)
    model = Siglip2VisionModel(Siglip2VisionConfig(num_patches=16, **TINY)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    model.save_pretrained(tmp_path)
    enc = _ours(tmp_path)
    assert (enc.cfg.pos_grid, enc.cfg.pos_resize_mode, enc.cfg.pos_resize_antialias) == (4, "bilinear", True)
    pixels = torch.rand(1, 3, *size) * 2 - 1
    h, w = size[0] // 16, size[1] // 16
    with torch.no_grad():
        ref = model(_patchify(pixels, 16), pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long),
                    spatial_shapes=torch.tensor([[h, w]]), output_hidden_states=True).hidden_states[-1]
        out, _ = enc(pixels)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_checkpoint_grid_is_resized_on_load(siglip_dir):
    # X-Omni grows a pretrained grid to 128x128 once; here 4x4 -> 8x8 with the configured mode.
    path, model = siglip_dir
    enc = _ours(path, pos_grid=8, pos_resize_mode="bilinear")
    table = model.embeddings.position_embedding.weight.detach()
    want = torch.nn.functional.interpolate(table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(8, 8),
                                           mode="bilinear", align_corners=False)
    torch.testing.assert_close(enc.embeddings.position_embedding.weight,
                               want.permute(0, 2, 3, 1).reshape(64, -1))
    with pytest.raises(ValueError, match="pos_grid"):
        _ours(path, pos_grid=8).load_hf_weights(path, resize_grid=False)


def test_bad_inputs_raise_clear_errors(siglip_dir, tmp_path):
    path, _ = siglip_dir
    enc = _ours(path)
    with pytest.raises(ValueError, match="64x50 is not a multiple of the 16-pixel token grid: use e.g. 64x48"):
        enc(torch.zeros(1, 3, 64, 50))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="safetensors"):
        enc.load_hf_weights(tmp_path)
    wrong = SiglipViTEncoder(config_from_hf(path, **SMALL_VQ, num_layers=3))
    with pytest.raises(ValueError, match="lacks"):
        wrong.load_hf_weights(path)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_config("huge")
