"""SiglipVQTokenizer end to end: shapes, gradients, skip path, freezing, save/load, presets."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_xomni.models.siglip_vq import SigLIPVQConfig, SiglipVQTokenizer, tokenizer_config


def _tiny(**overrides):
    torch.manual_seed(0)
    return SiglipVQTokenizer(tokenizer_config("tiny", **overrides))


def _pixels(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_xomni_preset_numbers():
    cfg = tokenizer_config("xomni")
    assert (cfg.patch_size, cfg.width, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (16, 1536, 40, 16, 6144)
    assert (cfg.pos_grid, cfg.num_positions, cfg.pos_resize_mode) == (128, 128 * 128, "bilinear")
    assert (cfg.codebook_size, cfg.codebook_dim, cfg.adapter_dim) == (16384, 2048, 1536)
    assert (cfg.quant_temperature, cfg.commitment_beta, cfg.skip_quant_prob) == (2.0, 0.25, 0.1)
    assert cfg.adapter_num_blocks == 2
    assert cfg.mlp_dim == 4 * cfg.width  # MLP ratio 4


@pytest.mark.parametrize("size", [(64, 64), (64, 128), (128, 48)])
def test_any_resolution_code_and_feature_shapes(size):
    tok = _tiny().eval()
    h, w = size[0] // 16, size[1] // 16
    codes = tok.encode(_pixels(2, *size))
    assert codes.shape == (2, h, w) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    feats = tok.decode_features(codes)
    assert feats.shape == (2, h * w, 64)
    out, aux = tok(_pixels(2, *size))
    assert out.shape == (2, h * w, 64) and aux["codes"].shape == (2, h, w) and aux["grid"] == (h, w)


def test_eval_forward_equals_decode_of_encode():
    tok = _tiny().eval()
    x = _pixels(2, 64, 128)
    codes = tok.encode(x)
    with torch.no_grad():
        feats, aux = tok(x)
    assert torch.equal(aux["codes"], codes)
    torch.testing.assert_close(feats, tok.decode_features(codes))
    # Raster order: token (i, j) of the grid is row i*w + j of the features; a single changed code
    # changes its own feature most (GroupNorm statistics spread a small change everywhere else).
    changed = codes.clone()
    changed[0, 1, 5] = (changed[0, 1, 5] + 1) % 256
    with torch.no_grad():
        diff = (tok.decode_features(changed) - feats).abs().amax(-1)
    assert int(diff[0].argmax()) == 1 * 8 + 5 and diff[1].max() == 0


def test_gradients_reach_encoder_prequant_conv_and_codebook():
    tok = _tiny(skip_quant_prob=0.0).train()
    feats, aux = tok(_pixels(2, 64, 64))
    (feats.pow(2).mean() + aux["loss"]).backward()
    for name in ("quant_conv.weight", "quantizer.codebook", "encoder.embeddings.patch_embedding.weight",
                 "encoder.embeddings.position_embedding.weight", "encoder.encoder.layers.0.self_attn.q_proj.weight",
                 "adapter.post_quant_conv.weight"):
        grad = dict(tok.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The task gradient alone (no VQ loss) still reaches the encoder through the straight-through path.
    tok.zero_grad()
    feats, _ = tok(_pixels(2, 64, 64))
    feats.pow(2).mean().backward()
    assert tok.encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert tok.quant_conv.weight.grad.abs().sum() > 0


def test_skip_prob_one_gives_unquantized_path():
    tok = _tiny(skip_quant_prob=1.0).train()
    x = _pixels(2, 64, 128)
    feats, aux = tok(x)
    assert aux["skip_mask"].all()
    # Unquantized path built by hand from the parts: encoder -> 1x1 conv -> L2 norm -> adapter.
    enc, grid = tok.encoder(x)
    z = F.conv2d(enc.transpose(1, 2).reshape(2, 64, *grid), tok.quant_conv.weight, tok.quant_conv.bias)
    z = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(feats, tok.adapter(z, grid))
    tok0 = _tiny(skip_quant_prob=0.0).train()
    feats0, _ = tok0(x)
    assert (feats0 - feats).abs().max() > 1e-3  # quantizing changes the output


def test_freeze_encoder():
    tok = _tiny(freeze_encoder=True, skip_quant_prob=0.0).train()
    assert not tok.encoder.training and tok.quantizer.training
    assert not any(p.requires_grad for p in tok.encoder.parameters())
    feats, aux = tok(_pixels(1, 64, 64))
    (feats.mean() + aux["loss"]).backward()
    assert all(p.grad is None for p in tok.encoder.parameters())
    assert tok.quant_conv.weight.grad.abs().sum() > 0 and tok.quantizer.codebook.grad.abs().sum() > 0


def test_gradient_checkpointing_matches_plain():
    x = _pixels(2, 64, 64)
    grads = []
    for ckpt in (False, True):
        tok = _tiny(gradient_checkpointing=ckpt, skip_quant_prob=0.0).train()
        feats, aux = tok(x)
        (feats.pow(2).mean() + aux["loss"]).backward()
        grads.append(tok.encoder.embeddings.patch_embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_roundtrip(tmp_path):
    tok = _tiny().eval()
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    back = SiglipVQTokenizer.from_pretrained(tmp_path).eval()
    assert back.cfg == tok.cfg
    x = _pixels(1, 48, 64)
    assert torch.equal(back.encode(x), tok.encode(x))
    torch.testing.assert_close(back.decode_features(tok.encode(x)), tok.decode_features(tok.encode(x)))
    assert SiglipVQTokenizer.from_pretrained(tmp_path, freeze_encoder=True).cfg.freeze_encoder
    with pytest.raises(ValueError, match="save_pretrained"):
        SiglipVQTokenizer.from_pretrained(tmp_path / "nope")
    assert SigLIPVQConfig.load(tmp_path / "config.json") == tok.cfg


def test_bad_codes_and_configs_raise():
    tok = _tiny()
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tok.decode_features(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie"):
        tok.decode_features(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match="divisible"):
        tokenizer_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="pos_resize_mode"):
        tokenizer_config("tiny", pos_resize_mode="lanczos")
    with pytest.raises(ValueError, match="unknown SigLIPVQConfig fields"):
        SigLIPVQConfig.from_dict({"widht": 3})


def test_training_reduces_vq_loss_and_reseed_under_single_rank_group(tmp_path):
    # A few steps on a fixed batch must lower the VQ loss (the losses actually train something),
    # and dead-code re-seeding runs through the torch.distributed path (1-rank gloo group).
    tok = _tiny(skip_quant_prob=0.0).train()
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    x = _pixels(4, 64, 64)
    losses = []
    for _ in range(15):
        _, aux = tok(x)
        opt.zero_grad()
        aux["loss"].backward()
        opt.step()
        losses.append(aux["loss"].item())
    assert losses[-1] < 0.7 * losses[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        stats = tok.quantizer.usage_stats()
        assert stats["tokens"] == 15 * 4 * 16
        dead = tok.quantizer.reseed_dead_codes()
        assert len(dead) == round((1 - stats["usage_fraction"]) * 256)
    finally:
        dist.destroy_process_group()
