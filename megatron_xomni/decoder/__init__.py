"""Offline diffusion decoder (X-Omni section 3): FLUX + zero-initialised semantic projection."""
from .config import DecoderConfig, decoder_config
from .model import SemanticFluxTransformer, XOmniDecoder, build_decoder

__all__ = ["DecoderConfig", "decoder_config", "SemanticFluxTransformer", "XOmniDecoder", "build_decoder"]
