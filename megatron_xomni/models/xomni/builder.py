"""Build the model chunks this rank holds (one per virtual pipeline stage)."""

from __future__ import annotations

import torch

from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.models.xomni.model import XOmniModel
from megatron_xomni.parallel.layout import ParallelConfig


def build_model_chunks(
    model_cfg: XOmniModelConfig,
    parallel: ParallelConfig,
    pg_collection,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    **config_overrides,
) -> list[XOmniModel]:
    """One XOmniModel per virtual pipeline stage of this rank (a single one without VPP)."""
    from megatron.core import parallel_state as ps

    config = model_cfg.transformer_config(parallel, params_dtype, **config_overrides)
    vpp = parallel.virtual_pipeline_parallel
    chunks = []
    for i in range(vpp or 1):
        vp_stage = i if vpp else None
        chunks.append(
            XOmniModel(
                model_cfg,
                config,
                pg_collection,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                use_te=use_te,
            )
        )
    return chunks
