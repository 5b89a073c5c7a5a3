"""megatron-xomni: training stack for X-Omni-style discrete autoregressive image generation."""

from megatron_xomni.device import quiet_missing_extras as _quiet_missing_extras

__version__ = "0.1.0"

# Before anything imports megatron-core: its ~10 TE/Apex warnings per process become one notice.
_quiet_missing_extras()
