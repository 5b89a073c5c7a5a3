"""One checkpoint manager under every trainer; the payload format is pluggable.

The manager owns what every trainer needs and nothing model-specific: the save protocol of
megatron_xomni.checkpointing (iter_N.tmp -> iter_N -> latest, crash-safe, pruned to `keep_last`),
the resolved run config and the trainer's counters as JSON beside the payload, each rank's RNG
states, and the `in_save` fault point. The payload is whatever format fits the model:

- `MegatronPayload`: a megatron-core distributed checkpoint (the AR model and its optimizer; loads at
  any TP/PP/DP layout);
- `DCPPayload`: a torch distributed checkpoint of a (possibly FSDP2-sharded) module and its optimizer
  (the diffusion decoder, the SigLIP-VQ tokenizer); reshards over any number of ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron_xomni import checkpointing
from megatron_xomni.training import faults


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception:  # no megatron-core model-parallel state in this process
        pass
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_rng(state["python"]))
    np.random.set_state(_as_numpy_rng(state["numpy"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("megatron_tracker") is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def _as_python_rng(s):  # torch.load(weights_only) returns lists where random.getstate() had tuples
    return (s[0], tuple(s[1]), s[2])


def _as_numpy_rng(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), int(s[2]), int(s[3]), float(s[4]))


def _numpy_state_to_plain(state: dict) -> dict:
    """numpy's RNG state holds an ndarray, which weights_only loading refuses: store it as a tensor."""
    out = dict(state)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return out


def _numpy_state_from_plain(state: dict) -> dict:
    out = dict(state)
    if "numpy" in out:
        name, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (name, np.asarray(keys.numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32),
                        pos, has_gauss, gauss)
    return out


class MegatronPayload:
    """A megatron-core distributed checkpoint built from a sharded state dict (collective)."""

    def __init__(self, sharded_state_dict: Callable[[bool], dict], partial: bool = False):
        self.sharded_state_dict = sharded_state_dict  # is_loading -> sharded state dict
        self.partial = partial

    def write(self, folder: Path) -> None:
        from megatron.core import dist_checkpointing

        checkpointing.use_orphan_free_writer()
        dist_checkpointing.save(self.sharded_state_dict(False), str(folder))

    def read(self, folder: Path) -> dict:
        return checkpointing.load_checkpoint(folder, self.sharded_state_dict(True), partial=self.partial)


class DCPPayload:
    """A torch distributed checkpoint of a module and its optimizer (FSDP2-sharded or replicated).

    `model_keys` limits the module's part to those state-dict names (the trainable ones: a decoder
    that trains only its semantic projection saves megabytes, not FLUX's 24 GB; the frozen rest is
    rebuilt from the run's init source)."""

    def __init__(self, module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 model_keys: Optional[set] = None):
        self.module, self.optimizer, self.model_keys = module, optimizer, model_keys

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            model, optim = get_model_state_dict(self.module), None
        else:
            model, optim = get_state_dict(self.module, self.optimizer)
        if self.model_keys is not None:
            model = {k: v for k, v in model.items() if k in self.model_keys}
        return {"model": model} if optim is None else {"model": model, "optimizer": optim}

    def write(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(folder / "dcp"))

    def read(self, folder: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from megatron_xomni import safe_loading

        from torch.distributed.checkpoint.state_dict import StateDictOptions

        state = self._state()
        safe_loading.dcp_load(state, folder / "dcp")
        opts = StateDictOptions(strict=self.model_keys is None)
        if self.optimizer is None:
            set_model_state_dict(self.module, state["model"], options=opts)
        else:
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=opts)
        return state


@dataclass
class Resumed:
    """What a resumed run gets back besides its payload."""

    path: Path
    trainer_state: dict
    run_config: Optional[dict]
    same_layout: bool


class CheckpointManager:
    """Saves and finds a run's checkpoints (`<save_dir>/iter_N`); see the module docstring."""

    def __init__(self, save_dir: str, keep_last: Optional[int], debug_kill: str = "", layout: Optional[dict] = None):
        self.root = Path(save_dir)
        self.keep_last = keep_last
        self.debug_kill = debug_kill
        self.layout = layout or {}  # RNG streams continue exactly only in the layout that saved them

    def latest(self) -> Optional[Path]:
        """The checkpoint a run in this save_dir resumes from (None: a fresh run). Its pickled metadata
        is checked here, before any process group: a crafted file is refused in one line."""
        from megatron_xomni import safe_loading

        if checkpointing.latest_iteration(self.root) is None:
            return None
        path = checkpointing.resolve_checkpoint(self.root)
        for meta in sorted(path.rglob(safe_loading.METADATA_FILE)):
            safe_loading.check_metadata(meta.parent)
        return path

    def saved_run_config(self) -> Optional[dict]:
        path = self.latest()
        return checkpointing.read_metadata(path, "run_config") if path else None

    def save(self, step: int, payload, run_config: dict, trainer_state: dict,
             extra_metadata: Optional[dict[str, Any]] = None, rank_state: Optional[dict] = None) -> Path:
        """Collective: every rank calls it. Returns the published folder."""
        meta = {"run_config": run_config, "trainer_state": {**trainer_state, "layout": self.layout},
                **(extra_metadata or {})}
        per_rank = {"rng": _numpy_state_to_plain(capture_rng()), **(rank_state or {})}
        return checkpointing.save_checkpoint(
            self.root, step, payload.write, meta, keep_last=self.keep_last, per_rank=per_rank,
            before_publish=lambda: faults.fire("in_save", step, self.debug_kill))

    def load(self, path: Path, payload, restore_rng_state: bool = True) -> tuple[Any, Resumed]:
        """(payload result, Resumed). RNG states are restored when the layout is the saving one."""
        loaded = payload.read(path)
        state = dict(checkpointing.read_metadata(path, "trainer_state") or {})
        same = state.pop("layout", None) == self.layout
        rank_state = checkpointing.load_rank_state(path)
        if restore_rng_state and same and rank_state is not None and "rng" in rank_state:
            restore_rng(_numpy_state_from_plain(rank_state["rng"]))
        return loaded, Resumed(path, state, checkpointing.read_metadata(path, "run_config"), same)
