"""HF <-> Megatron conversion of the X-Omni model.

HF Qwen2/Qwen2.5 -> Megatron adds X-Omni's new parts with a documented initialisation:
- image embedding rows and image head rows are sampled from N(mean, covariance) of the
  existing text embedding rows / lm_head rows (Hewitt, "Initializing New Word Embeddings for
  Pretrained Language Models", 2021): new codes start as plausible, distinct tokens whose
  logits sit near the average text logit instead of dominating or copying one row;
- the image final norm is a copy of the text final norm;
- each vision block starts as a copy of its nearest LM layer (adapter block k <- LM layer k,
  head block k <- LM layer L - n + k) with its attention output projection and fc2 zeroed, so
  every vision block is an exact identity at step 0 (the converted model computes what Qwen
  computes) while gradients reach every weight from the first step.

Megatron <-> X-Omni HF layout (`XOmniForCausalLM`) is a pure renaming plus the fused
QKV / gate-up rules, so both directions are bit-exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_xomni.conversion import mapping as M
from megatron_xomni.conversion.hf_io import (
    ConversionError,
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    hf_config_for,
    model_config_from_hf,
)
from megatron_xomni.models.xomni.config import XOmniModelConfig

LAYOUTS = {"qwen2": M.QWEN2, "xomni": M.XOMNI}
_IGNORED_HF = ("rotary_emb.inv_freq",)


def sample_like_rows(table: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows ~ N(mean, cov) of `table`'s rows (computed in float64, returned in table dtype)."""
    x = table.double()
    mu = x.mean(0)
    centered = x - mu
    cov = centered.T @ centered / max(1, x.shape[0] - 1)
    cov += torch.eye(cov.shape[0], dtype=cov.dtype) * 1e-8 * cov.diagonal().mean().clamp(min=1e-12)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, x.shape[1], dtype=torch.float64, generator=generator)
    return (mu + z @ chol.T).to(table.dtype)


def hf_to_megatron_state(reader: HFCheckpointReader, mcfg: XOmniModelConfig, layout: str,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Global (TP=1, PP=1) Megatron state dict from an HF checkpoint."""
    spec = LAYOUTS[layout]
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    tied = reader.config.get("tie_word_embeddings", False) and "lm_head.weight" not in reader.names()
    for mname, hnames, kind in M.megatron_to_hf_names(mcfg, spec):
        if hnames == ["lm_head.weight"] and tied:
            hnames = [spec.global_names["embedding.word_embeddings.weight"]]
        tensors = [reader.get(h) for h in hnames]
        used.update(hnames)
        state[mname] = M.fuse(kind, tensors, mcfg).clone()
    unknown = sorted(n for n in reader.names() - used if not n.endswith(_IGNORED_HF))
    if unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) in the HF checkpoint have no mapping (first: {unknown[0]!r}): "
            "wrong architecture or a newer layout"
        )
    if layout == "qwen2":
        _init_new_parts(state, mcfg, seed)
    return state


def _init_new_parts(state: dict, mcfg: XOmniModelConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state["image_embedding.word_embeddings.weight"] = sample_like_rows(
        state["embedding.word_embeddings.weight"], mcfg.image_table_size, gen)
    state["image_output_layer.weight"] = sample_like_rows(
        state["output_layer.weight"], mcfg.image_table_size, gen)
    state["decoder.final_layernorm.image_norm.weight"] = state["decoder.final_layernorm.text_norm.weight"].clone()
    a, n, h = mcfg.num_vision_adapter_layers, mcfg.num_layers, mcfg.num_vision_head_layers
    sources = {k: a + k for k in range(a)} | {a + n + k: a + n - h + k for k in range(h)}
    for dst, src in sources.items():
        for suffix, _, _ in M.LAYER_RULES:
            t = state[f"decoder.layers.{src}.{suffix}"].clone()
            if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
                t.zero_()
            state[f"decoder.layers.{dst}.{suffix}"] = t


def megatron_state_to_hf(state: dict[str, torch.Tensor], mcfg: XOmniModelConfig,
                         layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) pairs of the requested HF layout."""
    for mname, hnames, kind in M.megatron_to_hf_names(mcfg, LAYOUTS[layout]):
        if mname not in state:
            raise ConversionError(f"Megatron checkpoint lacks {mname!r}: was it saved from this model?")
        for h, t in zip(hnames, M.unfuse(kind, state[mname], mcfg)):
            yield h, t.contiguous()


# ---- Megatron side: a TP=1/PP=1 model in a private one-rank process group ------------------
def _single_rank_model(mcfg: XOmniModelConfig):
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel, single_process_env

    if not torch.distributed.is_initialized():
        single_process_env()
    pg = initialize_parallel(ParallelConfig())
    (model,) = build_model_chunks(mcfg, ParallelConfig(), pg)
    return model


def _plain_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_megatron(state: dict[str, torch.Tensor], mcfg: XOmniModelConfig, out_root, iteration: int = 0,
                  extra_metadata: Optional[dict] = None) -> Path:
    """Write a dist-ckpt loadable at any TP/PP (atomic; see megatron_xomni.checkpointing)."""
    from megatron_xomni.checkpointing import save_checkpoint

    model = _single_rank_model(mcfg)
    expected = _plain_state(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(f"conversion produced no value for {missing[0]!r} ({len(missing)} missing)")
    for k, v in state.items():
        if k not in expected:
            raise ConversionError(f"unknown Megatron tensor {k!r}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConversionError(
                f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            )
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    meta = {"model_config": mcfg.to_dict(), **(extra_metadata or {})}
    return save_checkpoint(out_root, iteration, {"model": model.sharded_state_dict()}, meta)


def load_megatron(ckpt_root, iteration: Optional[int] = None) -> tuple[dict, XOmniModelConfig]:
    """Global state dict of a Megatron checkpoint saved at any TP/PP."""
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint

    path = resolve_checkpoint(ckpt_root, iteration)
    meta = read_metadata(path, "model_config")
    if meta is None:
        raise ConversionError(f"{path} has no model_config.json: not a megatron-xomni checkpoint")
    mcfg = XOmniModelConfig.from_dict(meta)
    model = _single_rank_model(mcfg)
    loaded = load_checkpoint(path, {"model": model.sharded_state_dict()}, partial=True)
    model.load_state_dict(loaded["model"], strict=False)
    return _plain_state(model), mcfg


# ---- top-level conversions ------------------------------------------------------------------
def convert_hf_to_megatron(hf_dir, out_root, seed: int = 0, vision_layers=(4, 4),
                           image_vocab_size: int = 16384, image_table_size: int = 16448) -> Path:
    reader = HFCheckpointReader(hf_dir)
    mcfg, layout = model_config_from_hf(reader.config, image_vocab_size, image_table_size, vision_layers)
    state = hf_to_megatron_state(reader, mcfg, layout, seed)
    return save_megatron(state, mcfg, out_root, extra_metadata={"hf_config": reader.config, "source": {"hf": str(hf_dir), "layout": layout}})


def convert_megatron_to_hf(ckpt_root, out_dir, layout: str, iteration: Optional[int] = None,
                           max_shard_bytes: int = 4 * 2**30, dtype: Optional[torch.dtype] = None) -> Path:
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown HF layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    from megatron_xomni.checkpointing import read_metadata, resolve_checkpoint

    state, mcfg = load_megatron(ckpt_root, iteration)
    base = read_metadata(resolve_checkpoint(ckpt_root, iteration), "hf_config") or {}
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for name, t in megatron_state_to_hf(state, mcfg, layout):
        writer.add(name, t.to(dtype) if dtype is not None else t)
    return writer.finish(hf_config_for(mcfg, layout, base if base.get("model_type") in (None, {"qwen2": "qwen2", "xomni": "x-omni"}[layout]) else {}))
