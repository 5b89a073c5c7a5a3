"""Imported once by the test forkserver so spawned ranks start with everything loaded."""
import torch  # noqa: F401
import megatron.core  # noqa: F401
import megatron.core.models.gpt  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import megatron.core.optimizer  # noqa: F401
import megatron.core.distributed  # noqa: F401
import megatron.core.dist_checkpointing  # noqa: F401
import transformers  # noqa: F401
import megatron_xomni.models.xomni  # noqa: F401
import megatron_xomni.parallel  # noqa: F401
