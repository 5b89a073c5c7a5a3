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

What an export keeps from its source (recorded at import in iter_N/conversion.json and
hf_config.json; a training run finds them through its run_config's `init_from` chain):
- the text table's padding (hf_io) is stripped again;
- the dtype: written in the source's dtype unless `dtype` is given; one line says which dtype was
  written, and another when the weights do not all fit it exactly (a run trained at a higher precision);
- tied embeddings (Qwen2.5 0.5B-3B): written tied (no lm_head.weight) while embedding and head are
  still equal; once training has made them differ, written untied, saying so in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_xomni.conversion import ConversionError
from megatron_xomni.conversion import mapping as M
from megatron_xomni.conversion import outputs
from megatron_xomni.conversion.hf_io import (
    DTYPES,
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    dtype_name,
    hf_config_for,
    model_config_from_hf,
)
from megatron_xomni.conversion.xomni_fields import RunParts, xomni_fields
from megatron_xomni.models.xomni.config import XOmniModelConfig

LAYOUTS = {"qwen2": M.QWEN2, "xomni": M.XOMNI}
_IGNORED_HF = ("rotary_emb.inv_freq",)
TEXT_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


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


def _tied(hf_config: dict) -> bool:
    return bool(hf_config.get("tie_word_embeddings", False))


def hf_to_megatron_state(reader: HFCheckpointReader, mcfg: XOmniModelConfig, layout: str,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Global (TP=1, PP=1) Megatron state dict from an HF checkpoint (text tables padded)."""
    spec = LAYOUTS[layout]
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    tied = _tied(reader.config) and "lm_head.weight" not in reader.names()
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
        _init_new_parts(state, mcfg, seed)  # from the real rows only, before padding
    for name in TEXT_TABLES:
        t = state[name]
        state[name] = torch.cat([t, t.new_zeros(mcfg.text_vocab_padding, t.shape[1])])
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


def megatron_state_to_hf(state: dict[str, torch.Tensor], mcfg: XOmniModelConfig, layout: str,
                         tied: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) pairs of the requested HF layout; padding rows stripped, no lm_head when `tied`."""
    tokens = mcfg.text_vocab_size - mcfg.text_vocab_padding
    for mname, hnames, kind in M.megatron_to_hf_names(mcfg, LAYOUTS[layout]):
        if mname not in state:
            raise ConversionError(f"Megatron checkpoint lacks {mname!r}: was it saved from this model?")
        if tied and mname == "output_layer.weight":
            continue
        t = state[mname][:tokens] if mname in TEXT_TABLES else state[mname]
        for h, part in zip(hnames, M.unfuse(kind, t, mcfg)):
            yield h, part.contiguous()


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


def _model_holding(state: dict[str, torch.Tensor], mcfg: XOmniModelConfig):
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
    return model


def save_megatron(state: dict[str, torch.Tensor], mcfg: XOmniModelConfig, plan: outputs.MegatronPlan,
                  rec: dict, extra_metadata: Optional[dict] = None) -> Path:
    """Write a dist-ckpt loadable at any TP/PP as the plan's iteration (atomic `latest` switch, see outputs)."""
    from megatron_xomni.checkpointing import save_checkpoint

    model = _model_holding(state, mcfg)  # every check before anything is written
    meta = {"model_config": mcfg.to_dict(), outputs.ITERATION_RECORD: rec, **(extra_metadata or {})}
    outputs.begin_megatron_root(plan, rec)
    with outputs.save_crash_points():
        path = save_checkpoint(plan.root, plan.iteration, {"model": model.sharded_state_dict()}, meta)
    outputs.finish_megatron_root(plan, rec)
    return path


def load_megatron(ckpt_root, iteration: Optional[int] = None) -> tuple[dict, XOmniModelConfig]:
    """Global state dict of a Megatron checkpoint saved at any TP/PP."""
    from megatron_xomni.checkpointing import read_metadata, resolve_checkpoint
    from megatron_xomni.models.xomni.checkpoint import load_weights

    path = resolve_checkpoint(ckpt_root, iteration)
    meta = read_metadata(path, "model_config")
    if meta is None:
        raise ConversionError(f"{path} has no model_config.json: not a megatron-xomni checkpoint")
    mcfg = XOmniModelConfig.from_dict(meta)
    model = _single_rank_model(mcfg)
    load_weights([model], path)
    return _plain_state(model), mcfg


def provenance(path: Path) -> tuple[dict, dict]:
    """(conversion record, HF config) of the conversion a checkpoint descends from: its own, or that of
    the checkpoint its run was initialised from (run_config.init_from, followed while the model config
    stays the same). Empty dicts when none is found."""
    from megatron_xomni.checkpointing import read_metadata, resolve_checkpoint

    model = read_metadata(path, "model_config")
    for _ in range(16):
        conv, hf = read_metadata(path, outputs.ITERATION_RECORD), read_metadata(path, "hf_config")
        if conv or hf:
            return conv or {}, hf or {}
        init = (read_metadata(path, "run_config") or {}).get("init_from")
        try:
            path = resolve_checkpoint(init) if init else None
        except (FileNotFoundError, ValueError):
            path = None
        if path is None or read_metadata(path, "model_config") != model:
            break
    return {}, {}


def _export_dtype(state: dict, source: Optional[str], requested: Optional[torch.dtype]) -> torch.dtype:
    """The dtype to write, saying which in one line (and when the weights do not all fit it exactly)."""
    if requested is not None:
        dtype, why = requested, "--dtype"
    elif source in DTYPES:
        dtype, why = DTYPES[source], "the source's dtype"
    else:
        dtype, why = torch.float32, "no source dtype recorded"
    inexact = sum(1 for t in state.values() if t.is_floating_point() and not torch.equal(t.to(dtype).to(t.dtype), t))
    outputs.say(f"wrote {dtype_name(dtype)} weights ({why})")
    if inexact:
        widest = dtype_name(next(t.dtype for t in state.values() if t.is_floating_point()))
        outputs.say(f"{inexact} tensors are not exactly representable in {dtype_name(dtype)} (the run trained at a higher "
             f"precision): they were rounded; pass --dtype {widest} to keep every bit")
    return dtype


def _keep_tie(state: dict, mcfg: XOmniModelConfig, source_tied: bool) -> bool:
    if not source_tied:
        return False
    tokens = mcfg.text_vocab_size - mcfg.text_vocab_padding
    emb, head = (state[n][:tokens] for n in TEXT_TABLES)
    if torch.equal(emb, head):
        return True
    outputs.say(f"training untied the text embedding and lm_head of this tied source (max |difference| "
         f"{(emb - head).abs().max().item():.3g}): writing lm_head.weight and tie_word_embeddings=false")
    return False


# ---- top-level conversions ------------------------------------------------------------------
def convert_hf_to_megatron(hf_dir, out_root, seed: int = 0, vision_layers=(4, 4),
                           image_vocab_size: int = 16384, image_table_size: int = 16448,
                           overwrite: bool = False, plan: Optional[outputs.MegatronPlan] = None) -> Path:
    """`plan`: the result of outputs.prepare_megatron_root(out_root, hf_dir, overwrite) if already checked."""
    plan = plan or outputs.prepare_megatron_root(out_root, hf_dir, overwrite)
    reader = HFCheckpointReader(hf_dir)
    mcfg, layout = model_config_from_hf(reader.config, image_vocab_size, image_table_size, vision_layers)
    state = hf_to_megatron_state(reader, mcfg, layout, seed)
    rec = outputs.record("megatron", hf_dir, layout=layout, source_dtype=dtype_name(reader.dtype()),
                         tie_word_embeddings=_tied(reader.config), text_vocab_padding=mcfg.text_vocab_padding)
    save_megatron(state, mcfg, plan, rec, extra_metadata={"hf_config": reader.config})
    return plan.root


def convert_megatron_to_hf(ckpt_root, out_dir, layout: str, iteration: Optional[int] = None,
                           max_shard_bytes: int = 4 * 2**30, dtype: Optional[torch.dtype] = None,
                           overwrite: bool = False, parts: Optional[RunParts] = None,
                           require_vision: bool = False) -> Path:
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown HF layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    from megatron_xomni.checkpointing import read_metadata, resolve_checkpoint

    parts = parts or RunParts()
    if parts.vision and layout != "xomni":
        raise ConversionError("--image-tokenizer/--decoder describe the X-Omni layout: pass --layout xomni")
    try:
        path = resolve_checkpoint(ckpt_root, iteration)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from None
    meta = read_metadata(path, "model_config")
    if meta is None:
        raise ConversionError(f"{path} has no model_config.json: not a megatron-xomni checkpoint")
    conv, base = provenance(path)  # the source's config.json: kept fields (bos/eos, ...) survive either layout
    if require_vision and layout == "xomni" and not parts.vision and "vision_config" not in base:
        raise ConversionError("the X-Omni layout needs vision_config: pass the run's --text-tokenizer, "
                              "--image-tokenizer and --decoder")
    tmp = outputs.prepare_hf_folder(out_dir, ckpt_root, overwrite)
    try:
        mcfg = XOmniModelConfig.from_dict(meta)
        source_dtype = conv.get("source_dtype") or base.get("dtype") or base.get("torch_dtype")
        extra = xomni_fields(path, mcfg, parts)
        if layout == "qwen2":
            extra.pop("mm_special_tokens", None)
        state, mcfg = load_megatron(ckpt_root, iteration)
        out_dtype = _export_dtype(state, source_dtype, dtype)
        tied = _keep_tie(state, mcfg, bool(conv.get("tie_word_embeddings", _tied(base))))
        if "vision_config" in extra:
            extra["vision_config"]["dtype"] = dtype_name(out_dtype)
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        for name, t in megatron_state_to_hf(state, mcfg, layout, tied):
            writer.add(name, t.to(out_dtype))
        writer.finish(hf_config_for(mcfg, layout, base, dtype=out_dtype, tied=tied, extra=extra))
        return outputs.publish_hf_folder(tmp, out_dir, outputs.record("hf", path, layout=layout,
                                                                       dtype=dtype_name(out_dtype)))
    finally:
        if tmp.exists():  # refused or failed before the swap: leave nothing behind
            shutil.rmtree(tmp)
