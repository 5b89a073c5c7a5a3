"""Model definitions built on megatron-core."""
