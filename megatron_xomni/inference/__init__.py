"""User-facing inference: XOmniPipeline (text -> image, image -> text) and the path/config checks behind it."""
from megatron_xomni.inference.pipeline import XOmniPipeline, init_process_group, to_pil
from megatron_xomni.inference.bundle import PipelinePaths, PipelineSpec, inspect_paths

__all__ = ["PipelinePaths", "PipelineSpec", "XOmniPipeline", "init_process_group", "inspect_paths", "to_pil"]
