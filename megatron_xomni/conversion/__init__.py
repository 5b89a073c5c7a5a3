"""Hugging Face <-> Megatron checkpoint conversion (declarative name mappings)."""
