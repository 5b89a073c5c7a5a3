"""Reading and writing Hugging Face checkpoints (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_xomni.models.xomni.config import XOmniModelConfig


class ConversionError(ValueError):
    """Bad input for a conversion; the message names the problem and the fix."""


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint, one safetensors shard open at a time."""

    def __init__(self, path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise ConversionError(f"{cfg} not found: point --hf at a Hugging Face model folder")
        self.config = json.loads(cfg.read_text())
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConversionError(
                f"no model.safetensors or model.safetensors.index.json in {self.path} "
                "(.bin checkpoints are not read: re-save with safe_serialization=True)"
            )
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).exists():
                raise ConversionError(f"shard {shard} listed in the index is missing from {self.path}")
        self.weight_map = weight_map
        self._open_name, self._open = None, None

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise ConversionError(f"tensor {name!r} is missing from {self.path}: wrong architecture?")
        if shard != self._open_name:  # keep only one shard open
            self._open = safe_open(self.path / shard, "pt")
            self._open_name = shard
        return self._open.get_tensor(name)

    def names_by_shard(self) -> list[str]:
        """Tensor names ordered so each shard is visited once."""
        return sorted(self.weight_map, key=lambda n: (self.weight_map[n], n))


def _rope_theta(cfg: dict) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def model_config_from_hf(cfg: dict, image_vocab_size: int = 16384, image_table_size: int = 16448,
                         vision_layers: tuple[int, int] = (4, 4)) -> tuple[XOmniModelConfig, str]:
    """Translate an HF config.json into (XOmniModelConfig, layout name)."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type == "x-omni" or "XOmniForCausalLM" in archs:
        layout = "xomni"
        adap, head = cfg["num_mm_adap_layers"], cfg["num_mm_head_layers"]
        lm_layers = cfg["num_hidden_layers"] - adap - head
        image_vocab_size, image_table_size = cfg["image_vocab_size"], cfg["mm_vocab_size"]
    elif model_type == "qwen2" or "Qwen2ForCausalLM" in archs:
        layout = "qwen2"
        adap, head = vision_layers
        lm_layers = cfg["num_hidden_layers"]
    else:
        raise ConversionError(
            f"unsupported architecture {archs or model_type!r}: expected Qwen2ForCausalLM or XOmniForCausalLM"
        )
    if cfg.get("use_sliding_window"):
        raise ConversionError("sliding-window attention is not supported: set use_sliding_window=false")
    mcfg = XOmniModelConfig(
        num_layers=lm_layers,
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        text_vocab_size=cfg["vocab_size"],
        image_vocab_size=image_vocab_size,
        image_table_size=image_table_size,
        num_vision_adapter_layers=adap,
        num_vision_head_layers=head,
        rotary_base=_rope_theta(cfg),
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
    )
    mcfg.validate()
    return mcfg, layout


def hf_config_for(mcfg: XOmniModelConfig, layout: str, base: dict | None = None) -> dict:
    """config.json for an exported model (keeps unrelated fields of `base`)."""
    cfg = dict(base or {})
    cfg.update(
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_query_groups,
        vocab_size=mcfg.text_vocab_size,
        rms_norm_eps=mcfg.norm_epsilon,
        max_position_embeddings=mcfg.max_position_embeddings,
        rope_theta=mcfg.rotary_base,
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype=cfg.get("torch_dtype", "float32"),
    )
    cfg.pop("rope_parameters", None)
    if layout == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=mcfg.num_layers)
    else:
        cfg.update(
            architectures=["XOmniForCausalLM"], model_type="x-omni",
            num_hidden_layers=mcfg.num_layers_total,
            num_mm_adap_layers=mcfg.num_vision_adapter_layers,
            num_mm_head_layers=mcfg.num_vision_head_layers,
            mm_vocab_size=mcfg.image_table_size, image_vocab_size=mcfg.image_vocab_size,
            mm_special_tokens=cfg.get("mm_special_tokens", ["<SOM>", "<EOM>", "<IMAGE>"]),
        )
    return cfg


class ShardedSafetensorsWriter:
    """Writes tensors into numbered safetensors shards of bounded size plus an index.

    Everything goes to a temporary folder that replaces the destination only when complete.
    """

    def __init__(self, out_dir, max_shard_bytes: int = 4 * 2**30):
        self.out = Path(out_dir)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            import shutil

            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}
        self.count = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        self.count += 1
        fname = f"model-{self.count:05d}.safetensors"
        save_file(self.pending, str(self.tmp / fname), metadata={"format": "pt"})
        for k in self.pending:
            self.weight_map[k] = fname
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict) -> Path:
        if self.pending:
            self._flush()
        # Rename to the usual names: a single shard is model.safetensors.
        if self.count == 1:
            os.replace(self.tmp / "model-00001.safetensors", self.tmp / "model.safetensors")
        else:
            total = self.count
            renamed = {}
            for i in range(1, total + 1):
                old = f"model-{i:05d}.safetensors"
                new = f"model-{i:05d}-of-{total:05d}.safetensors"
                os.replace(self.tmp / old, self.tmp / new)
                renamed[old] = new
            index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if self.out.exists():
            import shutil

            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out


def iter_safetensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    reader = HFCheckpointReader(path)
    for name in reader.names_by_shard():
        yield name, reader.get(name)
