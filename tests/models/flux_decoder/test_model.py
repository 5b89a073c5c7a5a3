"""The semantic FLUX transformer against diffusers' own FluxTransformer2DModel."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from megatron_xomni.models.flux_decoder import XOmniDecoder, build_decoder
from megatron_xomni.models.flux_decoder.model import NEW_PARAMS, transformer_from_config, vae_from_config

from tests.models.flux_decoder.conftest import ADAPTER_DIM, random_features, tiny_cfg, tiny_decoder

H, W, B = 2, 3, 2  # a non-square token grid


def plain_flux_like(sem) -> FluxTransformer2DModel:
    """diffusers' FLUX with the semantic transformer's weights (everything but the new params)."""
    cfg = {k: v for k, v in sem.config.items() if not k.startswith("_") and k not in ("adapter_dim", "decoder_variant")}
    plain = FluxTransformer2DModel(**cfg)
    sd = {k: v for k, v in sem.state_dict().items() if k not in NEW_PARAMS}
    plain.load_state_dict(sd, strict=True)
    return plain.eval()


def inputs(cfg, variant: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H * W, cfg.in_channels, generator=g)
    t = torch.rand(B, generator=g)
    ids = XOmniDecoder.image_ids((H, W), "cpu", torch.float32)
    if variant == "text":
        text = dict(encoder_hidden_states=torch.randn(B, 5, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(B, cfg.pooled_projection_dim, generator=g), txt_ids=torch.zeros(5, 3))
    else:
        text = {}
    return x, t, ids, text


def plain_text_inputs(sem, variant, text, batch):
    if variant == "text":
        return text
    # Image variant = FLUX with zero text tokens and the learned pooled vector.
    return dict(encoder_hidden_states=torch.zeros(batch, 0, sem.config.joint_attention_dim), txt_ids=torch.zeros(0, 3),
                pooled_projections=sem.pooled_embedding.detach().expand(batch, -1))


@pytest.mark.parametrize("variant", ["text", "image"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero_projection_equals_plain_flux_exactly(variant, checkpointing):
    cfg = tiny_cfg(variant)
    sem = transformer_from_config(cfg).eval()
    assert torch.count_nonzero(sem.semantic_proj.weight) == 0  # zero-initialised
    if sem.pooled_embedding is not None:  # any learned pooled value; equality must not depend on it
        sem.pooled_embedding.data.normal_()
    plain = plain_flux_like(sem)
    if checkpointing:
        sem.enable_gradient_checkpointing()
        plain.enable_gradient_checkpointing()
    x, t, ids, text = inputs(cfg, variant)
    feats = random_features(B, H, W) * 100  # large features: still exactly nothing through a zero linear
    ours = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=feats, return_dict=False, **text)[0]
    ref = plain(hidden_states=x, timestep=t, img_ids=ids, return_dict=False, **plain_text_inputs(sem, variant, text, B))[0]
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("variant", ["text", "image"])
def test_semantic_residual_is_added_between_double_and_single_blocks(variant):
    """Brute-force reference: run diffusers' blocks by hand and add W f after the last double block."""
    dec = tiny_decoder(variant)
    sem, cfg = dec.transformer, dec.cfg
    x, t, ids, text = inputs(cfg, variant, seed=1)
    feats = random_features(B, H, W, seed=1)
    ours = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=feats, return_dict=False, **text)[0]

    p = plain_text_inputs(sem, variant, text, B)
    with torch.no_grad():
        hs = sem.x_embedder(x)
        temb = sem.time_text_embed(t * 1000, p["pooled_projections"])
        enc = sem.context_embedder(p["encoder_hidden_states"])
        rope = sem.pos_embed(torch.cat([p["txt_ids"], ids]))
        for blk in sem.transformer_blocks:
            enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        hs = hs + feats @ sem.semantic_proj.weight.T
        for blk in sem.single_transformer_blocks:
            enc, hs = blk(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        ref = sem.proj_out(sem.norm_out(hs, temb))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # and the features matter: with them zeroed the output moves
    zero = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=feats * 0, return_dict=False, **text)[0]
    assert (zero - ours).abs().max() > 1e-3


def test_gradient_reaches_zero_initialised_projection():
    cfg = tiny_cfg("image")
    sem = transformer_from_config(cfg)
    x, t, ids, _ = inputs(cfg, "image")
    feats = random_features(B, H, W)
    target = torch.randn(B, H * W, cfg.in_channels, generator=torch.Generator().manual_seed(3))

    def loss_at(weight):
        sem.semantic_proj.weight.data.copy_(weight)
        out = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=feats, return_dict=False)[0]
        return (out - target).pow(2).mean()

    w0 = torch.zeros_like(sem.semantic_proj.weight)
    loss = loss_at(w0)
    loss.backward()
    grad = sem.semantic_proj.weight.grad.clone()
    assert grad.abs().sum() > 0
    # central finite difference along a random direction matches autograd's directional derivative
    d = torch.randn(grad.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    eps = 1e-3
    with torch.no_grad():
        fd = (loss_at(w0 + eps * d) - loss_at(w0 - eps * d)) / (2 * eps)
    torch.testing.assert_close(fd, (grad * d).sum(), rtol=2e-2, atol=1e-6)


def test_user_controlnet_residuals_still_apply():
    cfg = tiny_cfg("image")
    sem = transformer_from_config(cfg).eval()
    plain = plain_flux_like(sem)
    x, t, ids, _ = inputs(cfg, "image")
    ctrl = [torch.randn(B, H * W, cfg.inner_dim)]
    ours = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=random_features(B, H, W),
               controlnet_block_samples=ctrl, return_dict=False)[0]
    ref = plain(hidden_states=x, timestep=t, img_ids=ids, controlnet_block_samples=ctrl, return_dict=False,
                **plain_text_inputs(sem, "image", {}, B))[0]
    assert torch.equal(ours, ref)


def test_untrained_decoder_from_flux_weights_is_flux(tmp_path):
    """build_decoder(pretrained_path=FLUX folder): FLUX weights load, only the new params start at zero."""
    cfg = tiny_cfg("image")
    torch.manual_seed(7)
    plain = FluxTransformer2DModel(
        in_channels=cfg.in_channels, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim, pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=cfg.guidance_embeds, axes_dims_rope=cfg.axes_dims_rope,
    ).eval()
    plain.save_pretrained(tmp_path / "transformer")
    vae_from_config(cfg).save_pretrained(tmp_path / "vae")
    dec = build_decoder(tiny_cfg("image", pretrained_path=str(tmp_path)))
    sem = dec.transformer.eval()
    for name, value in plain.state_dict().items():
        assert torch.equal(sem.state_dict()[name], value), name
    assert torch.count_nonzero(sem.semantic_proj.weight) == 0
    x, t, ids, _ = inputs(cfg, "image")
    ours = sem(hidden_states=x, timestep=t, img_ids=ids, semantic_features=random_features(B, H, W), return_dict=False)[0]
    ref = plain(hidden_states=x, timestep=t, img_ids=ids, return_dict=False,
                **plain_text_inputs(sem, "image", {}, B))[0]
    assert torch.equal(ours, ref)
    # a FLUX folder of different dimensions is refused in one line
    with pytest.raises(ValueError, match="does not match"):
        build_decoder(tiny_cfg("image", pretrained_path=str(tmp_path), num_layers=3))


def test_bad_inputs_raise_one_line_value_errors():
    dec = tiny_decoder("image")
    cfg = dec.cfg
    x, t, ids, _ = inputs(cfg, "image")
    with pytest.raises(ValueError, match="adapter_dim"):
        dec.transformer(hidden_states=x, timestep=t, img_ids=ids, semantic_features=torch.randn(B, H * W, ADAPTER_DIM + 1))
    with pytest.raises(ValueError, match="tokens"):
        dec.transformer(hidden_states=x, timestep=t, img_ids=ids, semantic_features=torch.randn(B, H * W + 1, ADAPTER_DIM))
    with pytest.raises(ValueError, match="no text stream"):
        dec.transformer(hidden_states=x, timestep=t, img_ids=ids, encoder_hidden_states=torch.randn(B, 3, cfg.joint_attention_dim))
    with pytest.raises(ValueError, match="multiples of 16"):
        dec.encode_pixels(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="does not match"):
        dec.unpack(torch.zeros(1, 6, cfg.in_channels), (2, 2))


def test_wrong_variant_export_is_refused(tmp_path):
    tiny_decoder("image").save_pretrained(tmp_path / "img")
    with pytest.raises(ValueError, match="'image' decoder but a 'text' decoder was requested"):
        XOmniDecoder.from_pretrained(tmp_path / "img", variant="text")
    with pytest.raises(ValueError, match="decoder_config.json does not exist"):
        XOmniDecoder.from_pretrained(tmp_path)


def test_pack_unpack_matches_the_16px_token_grid():
    """Token (i, j) of the packed latent covers pixels [16i:16i+16, 16j:16j+16] (grid alignment)."""
    z = torch.arange(1 * 2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # latent of a 2x3 token grid
    packed = XOmniDecoder.pack(z)
    assert packed.shape == (1, 6, 8)
    for i in range(2):
        for j in range(3):
            expected = z[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)  # channel-major 2x2 patch
            assert torch.equal(packed[0, i * 3 + j], expected)
    assert torch.equal(XOmniDecoder.unpack(packed, (2, 3)), z)
