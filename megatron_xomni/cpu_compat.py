"""Run megatron-core 0.16.1 on a CPU build of torch with gloo.

megatron-core has no official CPU path. This module holds *every* CPU accommodation the
project needs, in one place, so that the rest of the code base is written exactly as it
would be for GPUs. `apply()` is a no-op whenever CUDA is available: importing or calling it
on a GPU machine changes nothing.

Each accommodation names the megatron-core 0.16.1 call sites it addresses. They were
checked against exactly that version (`CHECKED_MEGATRON_CORE_VERSION`);
`tests/test_cpu_compat.py` fails loudly when another version is installed, because the
list of call sites must then be re-audited.

| accommodation | why (megatron-core 0.16.1 call sites) |
|---|---|
| `torch.cuda.current_device()` returns the CPU device | new tensors are placed on it: rotary_pos_embedding.py:162, tensor_parallel/mappings.py:91,141,181, tensor_parallel/layers.py:552, p2p_communication.py:313,321, param_and_grad_buffer.py:800,806, state_dict_saver.py:252, attention.py:430 (KV cache), text_generation_controller.py |
| `torch.cuda.synchronize / current_stream / Stream / Event / nvtx` are no-ops | p2p_communication.py:398, filesystem_async.py:230, the inference controllers |
| CPU RNG-states tracker | tensor_parallel/random.py:235 reads `torch.cuda.get_rng_state`; on CPU the model-parallel RNG streams live in the CPU generator |
| `_CudaToCpuMode` (a TorchFunctionMode) maps `device="cuda"`, `.cuda()`, `.to("cuda")` and `pin_memory` to the CPU, and reports `tensor.type()` under CUDA names | device="cuda": transformer/utils.py:35, schedules.py:596,983,2138, optimizer.py:473,481,485,907, clip_grads.py:90,103,115,174,207, utils.py:1207; `.type()` checks: clip_grads.py:167, optimizer.py:671,690, distrib_optimizer.py:361,420,582 |

Two more accommodations are *not* patches and live where they belong:
- `WrappedTorchNorm` refuses sequence parallelism (transformer/torch_norm.py:32), so the local
  layer spec uses `megatron_xomni.models.xomni.norm.RMSNorm`, which marks its weight
  `sequence_parallel` like Transformer Engine's norms do.
- The dist-ckpt async writer spawns a Manager process, so scripts that save checkpoints keep an
  `if __name__ == "__main__":` guard (all of ours do).
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata

import torch
from torch.overrides import TorchFunctionMode

CHECKED_MEGATRON_CORE_VERSION = "0.16.1"

_log = logging.getLogger(__name__)
_APPLIED = False
_MODE: "_CudaToCpuMode | None" = None


def cuda_available() -> bool:
    """True when a usable CUDA device exists (then nothing here is applied)."""
    return torch.cuda.is_available()


def installed_megatron_core_version() -> str:
    return metadata.version("megatron-core")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placement requests made inside megatron-core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def _install_cpu_rng_tracker() -> None:
    """Keep megatron-core's model-parallel RNG streams in the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same contract as CudaRNGStatesTracker (named, forkable streams) on the CPU."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Used by activation recomputation (CheckpointFunction) to save/restore the stream.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Anything created before this point must be rebuilt with the CPU tracker.
    mrandom.initialize_rng_tracker(force_reset=True)


class _NoOpStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoOpEvent(_NoOpStream):
    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


def apply() -> bool:
    """Apply the CPU accommodations once; returns True when they are active.

    Does nothing (returns False) when CUDA is available.
    """
    global _APPLIED, _MODE
    if cuda_available():
        return False
    if _APPLIED:
        return True
    version = installed_megatron_core_version()
    if version != CHECKED_MEGATRON_CORE_VERSION:
        _log.warning(
            "megatron-core %s is installed but the CPU accommodations were checked against %s; "
            "install megatron-core==%s",
            version, CHECKED_MEGATRON_CORE_VERSION, CHECKED_MEGATRON_CORE_VERSION,
        )
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    _install_cpu_rng_tracker()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the life of the process (this thread)
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED


@contextlib.contextmanager
def suspended():
    """The CUDA->CPU TorchFunctionMode popped for the block (when it is the innermost mode).

    The mode adds a Python call to every torch function (~1-2 us each, measured); code that
    places all its tensors itself and calls no megatron-core CUDA placement (the lean decode
    path) runs without it.
    """
    stack = torch.overrides._get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
