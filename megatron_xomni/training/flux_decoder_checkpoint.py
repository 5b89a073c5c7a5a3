"""Decoder training checkpoints (exact resume) and diffusers-format export, FSDP2-aware.

A checkpoint holds only what training changes: the trainable parameters (full, unsharded,
safetensors), the optimizer state (full, keyed by parameter name), each rank's RNG states and the
step. Frozen weights are rebuilt from the run's init source, so a checkpoint of a decoder that
only trains ``semantic_proj`` is megabytes, not FLUX's 24 GB.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from megatron_xomni.models.flux_decoder.model import XOmniDecoder, transformer_from_config

CKPT_PREFIX = "step_"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state(transformer: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank must call it; rank 0 gets the values)."""
    sd = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if names is None or k in names}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, transformer, optimizer, trainable: list[str], meta: dict) -> Path:
    """Write ``ckpt_dir/step_XXXXXXX`` (collective)."""
    path = Path(ckpt_dir) / f"{CKPT_PREFIX}{step:07d}"
    model_sd = full_state(transformer, set(trainable))
    optim_sd = get_optimizer_state_dict(
        transformer, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(path / "trainable.safetensors"))
        torch.save(optim_sd, path / "optimizer.pt")
        (path / "meta.json").write_text(json.dumps({"step": step, "trainable": trainable, **meta}, indent=2))
    _barrier()  # the folder exists before other ranks write their RNG files
    torch.save(rng_state(), path / f"rng_rank{_rank()}.pt")
    _barrier()
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in Path(ckpt_dir).glob(f"{CKPT_PREFIX}*") if (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):])) if done else None


def load_checkpoint(path: Path, transformer, optimizer, expected_variant: str) -> int:
    """Restore parameters, optimizer and this rank's RNG; returns the step to continue from."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("variant") != expected_variant:
        raise ValueError(f"checkpoint {path} is a {meta.get('variant')!r} decoder run; this run trains {expected_variant!r}")
    model_sd = load_file(str(path / "trainable.safetensors"))
    missing = set(meta["trainable"]) - set(model_sd)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {sorted(missing)[:3]}; it is incomplete")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(transformer, model_sd, options=opts)
    set_optimizer_state_dict(transformer, optimizer, torch.load(path / "optimizer.pt", weights_only=True), options=opts)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return int(meta["step"])


def export_decoder(decoder: XOmniDecoder, out: str | Path) -> Path | None:
    """Write the trained decoder in diffusers format (collective under FSDP; rank 0 writes)."""
    sd = full_state(decoder.transformer)
    out = Path(out)
    if _rank() == 0:
        plain = transformer_from_config(decoder.cfg)  # an unsharded twin to call save_pretrained on
        plain.load_state_dict(sd, strict=True)
        XOmniDecoder(decoder.cfg, plain, decoder.vae, decoder.prompt_encoder).save_pretrained(out)
    _barrier()
    return out
