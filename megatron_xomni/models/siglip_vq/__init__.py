"""SigLIP-VQ semantic image tokenizer (X-Omni section 1)."""
from megatron_xomni.models.siglip_vq.adapter import ConvAdapter, ResidualConvBlock
from megatron_xomni.models.siglip_vq.config import SigLIPVQConfig, tokenizer_config
from megatron_xomni.models.siglip_vq.encoder import SiglipViTEncoder, config_from_hf, resize_position_grid
from megatron_xomni.models.siglip_vq.model import SiglipVQTokenizer
from megatron_xomni.models.siglip_vq.quantizer import IndexBackpropQuantizer, QuantizerOutput, code_stats, nearest_code

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
