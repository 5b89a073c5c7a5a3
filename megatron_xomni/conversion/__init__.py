"""Hugging Face <-> Megatron checkpoint conversion (declarative name mappings)."""


class ConversionError(ValueError):
    """Bad input for a conversion; the message (one line) names the problem and the fix."""
