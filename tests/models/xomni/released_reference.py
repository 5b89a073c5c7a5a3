"""X-Omni's released `XOmniForCausalLM` forward, written from transformers' own Qwen2 modules and built
from an X-Omni config.json (so a test that loads an export into it also checks the fields it reads).

Following the released inference code: image positions are the ids >= vocab_size; vision blocks (the
first num_mm_adap_layers and last num_mm_head_layers layers) compute every position and keep the result
at image positions only; the final norm is mm_norm at image positions and lm_norm elsewhere; text mode =
lm_head over the text vocabulary, image mode = the first image_vocab_size outputs of mm_head, every
other logit the dtype's minimum. `lm_head` is tied to `lm_embed_tokens` when tie_word_embeddings is set
(the released class's input embedding is lm_embed_tokens).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class RefXOmni(torch.nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import (Qwen2DecoderLayer, Qwen2RMSNorm,
                                                              Qwen2RotaryEmbedding)

        self.xcfg = dict(cfg)
        h = cfg["hidden_size"]
        qcfg = Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=h, intermediate_size=cfg["intermediate_size"],
                           num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                           num_key_value_heads=cfg["num_key_value_heads"], rope_theta=cfg["rope_theta"],
                           rms_norm_eps=cfg["rms_norm_eps"], max_position_embeddings=cfg["max_position_embeddings"])
        qcfg._attn_implementation = "eager"
        self.qcfg = qcfg
        self.V, self.mm, self.codes = cfg["vocab_size"], cfg["mm_vocab_size"], cfg["image_vocab_size"]
        self.adap, self.head = cfg["num_mm_adap_layers"], cfg["num_mm_head_layers"]
        self.lm_embed_tokens = torch.nn.Embedding(self.V, h)
        self.mm_embed_tokens = torch.nn.Embedding(self.mm, h)
        self.layers = torch.nn.ModuleList(Qwen2DecoderLayer(qcfg, i) for i in range(qcfg.num_hidden_layers))
        eps = cfg["rms_norm_eps"]
        self.lm_norm, self.mm_norm = Qwen2RMSNorm(h, eps), Qwen2RMSNorm(h, eps)
        self.rotary = Qwen2RotaryEmbedding(qcfg)
        self.lm_head = torch.nn.Linear(h, self.V, bias=False)
        self.mm_head = torch.nn.Linear(h, self.mm, bias=False)
        if cfg.get("tie_word_embeddings"):
            self.lm_head.weight = self.lm_embed_tokens.weight

    def forward(self, ids, mode):
        mask = (ids >= self.V)[..., None]
        h = torch.where(mask, self.mm_embed_tokens((ids - self.V).clamp(min=0)),
                        self.lm_embed_tokens(ids.clamp(max=self.V - 1)))
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        cos_sin = self.rotary(h, pos)
        causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            out = layer(h, attention_mask=causal, position_embeddings=cos_sin, position_ids=pos)
            out = out[0] if isinstance(out, tuple) else out
            h = out if self.adap <= i < n - self.head else torch.where(mask, out, h)
        h = torch.where(mask, self.mm_norm(h), self.lm_norm(h))
        full = h.new_full((*h.shape[:-1], self.V + self.mm), torch.finfo(h.dtype).min)
        if mode == "text":
            full[..., :self.V] = self.lm_head(h)
        else:
            full[..., self.V:self.V + self.codes] = self.mm_head(h)[..., :self.codes]
        return full

    # ---- the released checkpoint layout ---------------------------------------------------------
    def hf_state(self) -> dict:
        state = {}
        for k, v in self.state_dict().items():
            if "rotary" in k or (k == "lm_head.weight" and self.xcfg.get("tie_word_embeddings")):
                continue
            state[k if k in ("lm_head.weight", "mm_head.weight") else f"model.{k}"] = v.contiguous()
        return state

    @classmethod
    def from_folder(cls, path) -> "RefXOmni":
        """Load an X-Omni-layout folder (config.json + safetensors shards) in float32."""
        path = Path(path)
        ref = cls(json.loads((path / "config.json").read_text()))
        state = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(str(f)))
        own = {k.removeprefix("model."): v.float() for k, v in state.items()}
        missing, unexpected = ref.load_state_dict(own, strict=False)
        allowed = {k for k in missing if "rotary" in k} | ({"lm_head.weight"} if ref.xcfg.get("tie_word_embeddings") else set())
        assert set(missing) <= allowed and not unexpected, (missing, unexpected)
        return ref.eval()


def write_released(path, *, vocab, mm_vocab, image_vocab, adap, lm, head, hidden=64, heads=4, kv_heads=2,
                   intermediate=96, seed=0, dtype=torch.float32, init=None) -> RefXOmni:
    """Save a random model in the released layout (config.json + model.safetensors); returns it (fp32, eval).

    `init(name, param, generator)` fills each parameter; default N(0, 0.1)."""
    cfg = {"architectures": ["XOmniForCausalLM"], "model_type": "x-omni", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": adap + lm + head,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 256, "num_mm_adap_layers": adap, "num_mm_head_layers": head,
           "mm_vocab_size": mm_vocab, "image_vocab_size": image_vocab, "tie_word_embeddings": False,
           "mm_special_tokens": ["<SOM>", "<EOM>", "<IMAGE>"], "torch_dtype": str(dtype).removeprefix("torch.")}
    gen = torch.Generator().manual_seed(seed)
    ref = RefXOmni(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if init is None:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                init(name, p, gen)
            p.copy_(p.to(dtype).float())  # the values the saved file holds
    path = Path(path)
    path.mkdir(parents=True)
    save_file({k: v.to(dtype) for k, v in ref.hf_state().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return ref
