"""The one X-Omni model loader: build the chunks at a layout, then load a dist-ckpt saved at any layout.

    from megatron_xomni.models.xomni.checkpoint import load_xomni

    chunks, model_cfg = load_xomni("runs/sft/ckpt")                                  # one process: TP=PP=1
    chunks, model_cfg = load_xomni("runs/sft/ckpt", ParallelConfig(tensor_parallel=2))  # under torchrun

Training, inference, RL and the checks all go through here (or through `load_weights` when they
build the chunks themselves, e.g. with training precision settings). The checkpoint folder protocol
(atomic save, `latest`, safe loading) is megatron_xomni.checkpointing's; megatron-core's
dist-ckpt reshards on load, so a checkpoint saved at TP2 x PP2 loads at TP1 and vice versa.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.parallel.layout import LayoutError, ParallelConfig
from megatron_xomni.safe_loading import UnsafeCheckpointError


def _unwrap(m):
    """The XOmniModel inside a DDP / Float16Module wrapper."""
    return m.module if hasattr(m, "module") and not hasattr(m, "model_cfg") else m


def _chunk_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state_dict(chunks: list, metadata: dict | None = None) -> dict:
    """{'model': ...} (or model0, model1, ... with virtual pipeline stages) for dist-ckpt."""
    return {k: _unwrap(c).sharded_state_dict(metadata=metadata) for k, c in zip(_chunk_keys(chunks), chunks)}


def load_model_state(chunks: list, loaded: dict) -> None:
    """Copy a loaded `model_sharded_state_dict` into the chunks."""
    for key, chunk in zip(_chunk_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=False)


def checkpoint_folder(ckpt: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """The iteration folder to load: `ckpt` itself when it is one (holds dist-ckpt metadata.json),
    else the `iteration` (default: latest) of the checkpoint root `ckpt`."""
    path = Path(ckpt)
    if iteration is None and (path / "metadata.json").is_file():
        return path
    return resolve_checkpoint(path, iteration)


def read_model_config(folder: str | os.PathLike) -> XOmniModelConfig:
    """The XOmniModelConfig a checkpoint folder was saved with (its model_config.json)."""
    saved = read_metadata(folder, "model_config")
    if saved is None:
        raise ValueError(f"{folder} has no model_config.json: not a megatron-xomni model checkpoint "
                         "(train, convert or re-save it with megatron_xomni)")
    return XOmniModelConfig.from_dict(saved)


def load_weights(chunks: list, folder: str | os.PathLike) -> None:
    """Collective: load the model part of a dist-ckpt folder (a model or a training checkpoint) into
    built chunks. ValueError in one line when its tensors do not fit these chunks."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = load_checkpoint(folder, model_sharded_state_dict(chunks), partial=True)
    except (Exception, CheckpointException) as e:  # a shape/key mismatch, over many lines; torch's
        # CheckpointException (what a mismatch on any rank becomes) is a BaseException, not an Exception
        if isinstance(e, CheckpointException) and e.failures:  # the first rank's own exception says what
            failure = next(iter(e.failures.values()))
            e = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(e, UnsafeCheckpointError):  # a tampered file is its own error, not a model mismatch
            raise UnsafeCheckpointError(str(e)) from None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"checkpoint {folder} cannot be loaded into this model ({type(e).__name__}: {first}); "
                         "check the model config, or re-save / re-convert the checkpoint") from None
    load_model_state(chunks, loaded)


def current_layout() -> ParallelConfig:
    """ParallelConfig of the initialised megatron-core parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelConfig(
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_parallel=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel=ps.get_context_parallel_world_size(),
    )


def _same_layout(a: ParallelConfig, b: ParallelConfig) -> bool:
    return (a.tensor_parallel, a.pipeline_parallel, a.virtual_pipeline_parallel or None, a.context_parallel) == \
        (b.tensor_parallel, b.pipeline_parallel, b.virtual_pipeline_parallel or None, b.context_parallel)


def _brief(p: ParallelConfig) -> str:
    vpp = f" VPP={p.virtual_pipeline_parallel}" if p.virtual_pipeline_parallel else ""
    return f"TP={p.tensor_parallel} PP={p.pipeline_parallel}{vpp} CP={p.context_parallel}"


def load_xomni(
    ckpt_root: str | os.PathLike,
    parallel: Optional[ParallelConfig] = None,
    pg=None,
    iteration: Optional[int] = None,
    dtype: Optional[str | torch.dtype] = None,
    model_config: Optional[XOmniModelConfig] = None,
    **build_overrides,
) -> tuple[list, XOmniModelConfig]:
    """Build the model chunks this rank holds at `parallel` and load the checkpoint into them.

    `ckpt_root`: a checkpoint root (loads `iteration`, default the latest) or one iteration folder.
    `parallel`: the layout; default: the initialised parallel state's, else TP=PP=1. Without an
    initialised parallel state one is started at `parallel` (a plain `python` process becomes a
    one-rank world). `pg`: the ProcessGroupCollection (default: megatron-core's global groups).
    `dtype`: parameter dtype (torch.dtype, "auto" = bf16 on a GPU else fp32, "float32", "bfloat16";
    default fp32). `model_config`: build this config instead of the checkpoint's model_config.json
    (it must describe the same tensors). `build_overrides` go to TransformerConfig.

    Returns (chunks, model_config); the chunks are in eval mode on this rank's device.
    Every rank must call it; errors (missing checkpoint, a layout the model cannot split into,
    tensors that do not fit) are one-line ValueErrors, raised before any weights are read.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_xomni.device import resolve_dtype
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel.init import initialize_parallel, single_process_env

    folder = checkpoint_folder(ckpt_root, iteration)
    mcfg = model_config or read_model_config(folder)
    mcfg.validate()
    torch_dtype = torch.float32 if dtype is None else resolve_dtype(dtype)
    if ps.model_parallel_is_initialized():
        here = current_layout()
        if parallel is not None and not _same_layout(parallel, here):
            raise LayoutError(f"load_xomni(parallel={_brief(parallel)}) but the parallel state is {_brief(here)}: "
                              "pass the layout the process groups were started with (or parallel=None)")
        parallel = here if parallel is None else parallel
        parallel.validate_for(mcfg, torch.distributed.get_world_size(), decoding=False)
    else:
        parallel = parallel or ParallelConfig()
        if "WORLD_SIZE" not in os.environ:
            single_process_env()
        parallel.validate_for(mcfg, int(os.environ["WORLD_SIZE"]))
        pg = initialize_parallel(parallel)
    pg = pg or ProcessGroupCollection.use_mpu_process_groups()
    chunks = build_model_chunks(mcfg, parallel, pg, params_dtype=torch_dtype, **build_overrides)
    load_weights(chunks, folder)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for c in chunks:
        c.to(device).eval()
    return chunks, mcfg
