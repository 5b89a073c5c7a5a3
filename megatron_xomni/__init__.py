"""megatron-xomni: training stack for X-Omni-style discrete autoregressive image generation."""

__version__ = "0.1.0"
