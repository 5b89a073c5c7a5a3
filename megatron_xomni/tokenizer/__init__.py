"""SigLIP-VQ semantic image tokenizer (X-Omni section 1)."""
from .adapter import ConvAdapter, ResidualConvBlock
from .config import SigLIPVQConfig, tokenizer_config
from .encoder import SiglipViTEncoder, config_from_hf, resize_position_grid
from .model import SiglipVQTokenizer
from .quantizer import IndexBackpropQuantizer, QuantizerOutput, code_stats, nearest_code

__all__ = [
    "ConvAdapter",
    "IndexBackpropQuantizer",
    "QuantizerOutput",
    "ResidualConvBlock",
    "SigLIPVQConfig",
    "SiglipVQTokenizer",
    "SiglipViTEncoder",
    "code_stats",
    "config_from_hf",
    "nearest_code",
    "resize_position_grid",
    "tokenizer_config",
]
