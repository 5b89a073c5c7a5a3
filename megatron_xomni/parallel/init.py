"""Start torch.distributed and megatron-core's process groups for a ParallelConfig."""

from __future__ import annotations

import datetime
import os

import torch

from megatron_xomni import cpu_compat
from megatron_xomni.parallel.layout import ParallelConfig


def free_port() -> int:
    """A free TCP port on the loopback interface (for single-node rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Outside torchrun: describe a one-rank world so process groups can start."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")


def initialize_parallel(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 10):
    """Initialise torch.distributed (gloo on CPU, NCCL + gloo for CPU tensors on GPU) and megatron-core's groups.

    Reads the usual torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Returns the
    `ProcessGroupCollection` that model code takes explicitly.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    on_cpu = cpu_compat.apply()
    if not torch.distributed.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # On GPU, NCCL for CUDA tensors and gloo for the CPU-side statistics some steps all-reduce
        # (loss sums, counters): a NCCL-only group refuses CPU tensors.
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "cuda:nccl,cpu:gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    parallel.validate_world(world)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tear down megatron-core groups and the default process group (avoids exit aborts)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
