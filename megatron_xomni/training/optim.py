"""DDP wrapping (megatron-core DistributedDataParallel) and the Megatron optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial


@dataclass
class OptimConfig:
    """Optimizer settings (AdamW through megatron-core)."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of decaying schedules."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1 style)."""
    overlap_grad_reduce: bool = False
    """Overlap DP gradient reduction with backward (GPU)."""

    def validate(self) -> None:
        from megatron_xomni.dataclass_utils import check_numbers

        check_numbers({"optim.lr": self.lr, "optim.min_lr": self.min_lr, "optim.weight_decay": self.weight_decay,
                       "optim.clip_grad": self.clip_grad, "optim.adam_eps": self.adam_eps}, 0, integer=False)
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}: lower min_lr")
        for name, beta in (("optim.adam_beta1", self.adam_beta1), ("optim.adam_beta2", self.adam_beta2)):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}={beta!r} must be in [0, 1)")


def wrap_and_build_optimizer(chunks: list, optim: OptimConfig, pg_collection, params_dtype=None):
    """Wrap each chunk in megatron-core DDP and build the Megatron optimizer over them."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # NaN/Inf steps are skipped and counted by the trainer
        bucket_size=None,
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0), pg_collection=pg_collection)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pg_collection)
    if len(wrapped) == 1:
        config.no_sync_func = wrapped[0].no_sync
    else:
        config.no_sync_func = [m.no_sync for m in wrapped]
    dtype = params_dtype or config.params_dtype
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    # Extra gloo groups only serve CPU-side optimizer-state gathers; megatron-core refuses them
    # together with explicit process groups (and on CPU the default backend is gloo anyway).
    optimizer = get_megatron_optimizer(opt_cfg, wrapped, use_gloo_process_groups=False, pg_collection=pg_collection)
    return wrapped, optimizer


def zero_grads(wrapped: list, optimizer) -> None:
    for m in wrapped:
        m.zero_grad_buffer()
    optimizer.zero_grad()
