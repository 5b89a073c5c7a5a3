"""Offline diffusion decoder (X-Omni section 3): FLUX + zero-initialised semantic projection."""
from .config import DecoderConfig, decoder_config
from .model import SemanticFluxTransformer, XOmniDecoder, build_decoder
from .sampling import sample, sample_from_codes

__all__ = [
    "DecoderConfig",
    "SemanticFluxTransformer",
    "XOmniDecoder",
    "build_decoder",
    "decoder_config",
    "sample",
    "sample_from_codes",
]
