"""DecoderRunConfig.vae_fit_steps: the tiny VAE is fitted before decoder training (a random VAE makes
every latent meaningless), saved to save_dir/init and reused as-is on resume."""

import torch

from tests.training.decoder_runs import decoder_cfg
from megatron_xomni.models.flux_decoder import build_decoder, decoder_config
from megatron_xomni.data.world_source import world_images
from megatron_xomni.training.flux_decoder import load_init


def _recon_mse(decoder, pixels):
    with torch.no_grad():
        rec = decoder.decode_latents(decoder.encode_pixels(pixels), (pixels.shape[2] // 16, pixels.shape[3] // 16))
    return torch.mean((rec - pixels) ** 2).item()


def test_fitted_vae_reconstructs_better_and_is_reused(tmp_path):
    torch.manual_seed(0)
    held, _ = world_images(range(1000, 1016), 64, seed=5)  # images the fit never sees
    random_vae = build_decoder(decoder_config("tiny", "image"), seed=0)
    cfg = decoder_cfg(save_dir=str(tmp_path), vae_fit_steps=60, image_size=64, seed=0)
    fitted = load_init(cfg)
    assert (tmp_path / "init" / "decoder_config.json").exists()
    before, after = _recon_mse(random_vae, held), _recon_mse(fitted, held)
    assert after < 0.5 * before, (before, after)
    again = load_init(cfg)  # resume path: loads the saved init instead of refitting
    for (n, a), (_, b) in zip(fitted.vae.state_dict().items(), again.vae.state_dict().items()):
        assert torch.equal(a, b), n
    assert again.cfg.scaling_factor == fitted.cfg.scaling_factor
