"""Parallel layout (TP, PP, virtual PP, SP, CP; DP derived) and process-group initialisation."""
from megatron_xomni.parallel.layout import LayoutError, ParallelConfig
from megatron_xomni.parallel.init import initialize_parallel, destroy_parallel

__all__ = ["LayoutError", "ParallelConfig", "initialize_parallel", "destroy_parallel"]
