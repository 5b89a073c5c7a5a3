"""Parallel layout (TP, PP, virtual PP, SP, CP; DP derived) and process-group initialisation."""
from megatron_xomni.parallel.layout import LayoutError, ParallelConfig
from megatron_xomni.parallel.init import destroy_parallel, free_port, initialize_parallel, single_process_env

__all__ = ["LayoutError", "ParallelConfig", "initialize_parallel", "destroy_parallel", "free_port", "single_process_env"]
