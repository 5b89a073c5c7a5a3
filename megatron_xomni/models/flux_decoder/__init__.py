"""Offline diffusion decoder (X-Omni section 3): FLUX + zero-initialised semantic projection."""
from megatron_xomni.models.flux_decoder.config import DecoderConfig, decoder_config
from megatron_xomni.models.flux_decoder.model import SemanticFluxTransformer, XOmniDecoder, build_decoder
from megatron_xomni.models.flux_decoder.sampling import sample, sample_from_codes

__all__ = [
    "DecoderConfig",
    "SemanticFluxTransformer",
    "XOmniDecoder",
    "build_decoder",
    "decoder_config",
    "sample",
    "sample_from_codes",
]
