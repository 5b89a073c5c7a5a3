"""Reading and writing Hugging Face checkpoints (config.json + safetensors, sharded or not), and
translating HF config.json files to and from the Megatron model config.

Text vocabulary padding: an HF text table of any size V becomes a Megatron table of
ceil(V / 128) * 128 rows (Megatron's `make_vocab_size_divisible_by = 128`), so one checkpoint loads at
every tensor-parallel size in {1, 2, 4, 8} (vocab-parallel tables need a multiple of TP). The
padding rows are zeros, recorded as `text_vocab_padding` in the model config (the text head masks them
to -inf: never sampled, never in the loss) and stripped again on export. Qwen's own vocabularies
(151,936 and 152,064 rows) are already multiples of 128 and get no padding.
"""

from __future__ import annotations

import json
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_xomni.conversion import ConversionError
from megatron_xomni.conversion.outputs import crash_point, recover_hf_folder
from megatron_xomni.models.xomni.config import XOmniModelConfig

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

__all__ = ["ConversionError", "HFCheckpointReader", "ShardedSafetensorsWriter", "model_config_from_hf",
           "hf_config_for", "padded_vocab_size", "dtype_name"]


def padded_vocab_size(vocab_size: int) -> int:
    """The TP-independent Megatron text table size for an HF vocabulary (see the module docstring)."""
    m = MAKE_VOCAB_SIZE_DIVISIBLE_BY
    return -(-int(vocab_size) // m) * m


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint, one safetensors shard open at a time."""

    def __init__(self, path):
        self.path = Path(path)
        recover_hf_folder(self.path)  # an export whose replacement was interrupted
        if not self.path.is_dir():
            raise ConversionError(f"HF folder {self.path} does not exist: point --hf at a Hugging Face model folder")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise ConversionError(f"{cfg} not found: point --hf at a Hugging Face model folder")
        try:
            self.config = json.loads(cfg.read_text())
        except ValueError as e:
            raise ConversionError(f"{cfg} is not valid JSON ({e}): re-download or re-export the model") from None
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
        return self._file(name).get_tensor(name)

    def _file(self, name: str):
        shard = self.weight_map.get(name)
        if shard is None:
            raise ConversionError(f"tensor {name!r} is missing from {self.path}: wrong architecture?")
        if shard != self._open_name:  # keep only one shard open
            self._open = safe_open(self.path / shard, "pt")
            self._open_name = shard
        return self._open

    def dtype(self) -> torch.dtype:
        """The floating dtype holding most of the parameters (what the checkpoint was saved in)."""
        sizes: dict[str, int] = {}
        for name in self.names_by_shard():
            sl = self._file(name).get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            sizes[sl.get_dtype()] = sizes.get(sl.get_dtype(), 0) + numel
        floats = {k: v for k, v in sizes.items() if k in _SAFETENSORS_FLOATS}
        if not floats:
            raise ConversionError(f"{self.path} holds no float16/bfloat16/float32 tensors: not a model checkpoint")
        return _SAFETENSORS_FLOATS[max(floats, key=floats.get)]

    def names_by_shard(self) -> list[str]:
        """Tensor names ordered so each shard is visited once."""
        return sorted(self.weight_map, key=lambda n: (self.weight_map[n], n))


def _rope_theta(cfg: dict) -> float:
    """RoPE theta of an HF config; ConversionError for any RoPE scaling (YaRN, dynamic, linear, ...)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    kinds = {d.get("rope_type", d.get("type")) for d in (params, scaling) if isinstance(d, dict)} - {None, "default"}
    if kinds or (scaling is not None and not isinstance(scaling, dict)):
        raise ConversionError(f"config.json sets RoPE scaling {kinds.pop() if kinds else scaling!r}, which the Megatron "
                              "model does not implement: convert a checkpoint without rope_scaling")
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float(params.get("rope_theta", 10000.0))


def model_config_from_hf(cfg: dict, image_vocab_size: int = 16384, image_table_size: int = 16448,
                         vision_layers: tuple[int, int] = (4, 4)) -> tuple[XOmniModelConfig, str]:
    """Translate an HF config.json into (XOmniModelConfig, layout name); the text table is padded."""
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
    vocab = int(cfg["vocab_size"])
    mcfg = XOmniModelConfig(
        num_layers=lm_layers,
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        text_vocab_size=padded_vocab_size(vocab),
        text_vocab_padding=padded_vocab_size(vocab) - vocab,
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


def hf_config_for(mcfg: XOmniModelConfig, layout: str, base: dict | None = None, *, dtype: torch.dtype,
                  tied: bool = False, extra: dict | None = None) -> dict:
    """config.json for an exported model (keeps unrelated fields of `base`; `extra` is written last)."""
    cfg = dict(base or {})
    cfg.update(
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_key_value_heads=mcfg.num_query_groups,
        vocab_size=mcfg.text_vocab_size - mcfg.text_vocab_padding,
        rms_norm_eps=mcfg.norm_epsilon,
        max_position_embeddings=mcfg.max_position_embeddings,
        rope_theta=mcfg.rotary_base,
        tie_word_embeddings=tied,
        hidden_act="silu",
        torch_dtype=dtype_name(dtype),
    )
    if "dtype" in cfg:  # transformers >= 4.56 writes `dtype`
        cfg["dtype"] = dtype_name(dtype)
    cfg.pop("rope_parameters", None)
    if layout == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=mcfg.num_layers)
        for key in ("num_mm_adap_layers", "num_mm_head_layers", "mm_vocab_size", "image_vocab_size",
                    "mm_special_tokens", "vision_config"):
            cfg.pop(key, None)
    else:
        cfg.update(
            architectures=["XOmniForCausalLM"], model_type="x-omni",
            num_hidden_layers=mcfg.num_layers_total,
            num_mm_adap_layers=mcfg.num_vision_adapter_layers,
            num_mm_head_layers=mcfg.num_vision_head_layers,
            mm_vocab_size=mcfg.image_table_size, image_vocab_size=mcfg.image_vocab_size,
            mm_special_tokens=cfg.get("mm_special_tokens", ["<SOM>", "<EOM>", "<IMAGE>"]),
        )
    if "layer_types" in cfg:  # transformers >= 4.56: one entry per layer (sliding windows are refused on import)
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    cfg.update(extra or {})
    return cfg


class ShardedSafetensorsWriter:
    """Writes tensors into numbered safetensors shards of bounded size plus an index, into a new folder
    (the caller swaps it into place: see megatron_xomni.conversion.outputs)."""

    def __init__(self, folder, max_shard_bytes: int = 4 * 2**30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
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
        save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        for k in self.pending:
            self.weight_map[k] = fname
        self.pending, self.pending_bytes = {}, 0
        crash_point("hf-during-write")

    def finish(self, config: dict) -> Path:
        if self.pending:
            self._flush()
        # Rename to the usual names: a single shard is model.safetensors.
        if self.count == 1:
            (self.folder / "model-00001.safetensors").rename(self.folder / "model.safetensors")
        else:
            total = self.count
            renamed = {}
            for i in range(1, total + 1):
                old = f"model-{i:05d}.safetensors"
                new = f"model-{i:05d}-of-{total:05d}.safetensors"
                (self.folder / old).rename(self.folder / new)
                renamed[old] = new
            index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        return self.folder

