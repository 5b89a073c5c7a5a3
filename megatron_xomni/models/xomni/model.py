"""The unified X-Omni autoregressive model on megatron-core's GPTModel.

Text ids [0, V) use the GPTModel's own embedding and output layer (Qwen's embedding and
lm_head); image ids V + k use a separate, vocab-parallel image embedding and image head
(`image_table_size` rows, of which the first `image_vocab_size` are codes). Vision blocks and
the per-position final norm come from the layer spec (`layer_spec.py`).

Loss: each target is scored by the head of its own modality, exactly as decoding works
(text mode: text head over the text vocabulary; image mode: image head over the codes).
Padding rows of the text table (`text_vocab_padding`, added on conversion) and the image table's
spare slots are -inf in the logits, so neither is ever sampled nor part of a softmax.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel

from megatron_xomni.models.xomni.config import XOmniModelConfig
from megatron_xomni.models.xomni.cpu_linear import route_cpu_gemms
from megatron_xomni.models.xomni.layer_spec import xomni_block_spec
from megatron_xomni.models.xomni.layers import ImagePositions, _ReadsImagePositions

TEXT, IMAGE = "text", "image"


class XOmniModel(GPTModel):
    def __init__(
        self,
        model_cfg: XOmniModelConfig,
        config,
        pg_collection,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        use_te: Optional[bool] = None,
    ):
        if config.recompute_granularity is not None and model_cfg.num_layers_total != model_cfg.num_layers:
            raise ValueError(
                "activation recomputation is not supported with vision blocks (they read a "
                "per-forward image mask): set recompute_granularity=None"
            )
        pp_rank = pg_collection.pp.rank() if hasattr(pg_collection, "pp") else 0
        super().__init__(
            config=config,
            transformer_layer_spec=xomni_block_spec(model_cfg, config, vp_stage, pp_rank, use_te),
            vocab_size=model_cfg.text_vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=model_cfg.rotary_base,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.model_cfg = model_cfg
        if self.pre_process:
            self.image_embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=model_cfg.image_table_size,
                max_sequence_length=model_cfg.max_position_embeddings,
                position_embedding_type="rope",  # rope: no learned position table
                tp_group=self.pg_collection.tp,
            )
            self.image_embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process:
            self.image_output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                model_cfg.image_table_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=self.pg_collection.tp,
            )
            self.image_output_layer.weight.is_embedding_or_output_parameter = True
        self.image_positions = ImagePositions()
        for module in self.modules():
            if isinstance(module, _ReadsImagePositions):
                module.image_positions = self.image_positions
        # CPU-only machines: the linears' fp32 GEMMs run on oneDNN instead of MKL (cpu_linear.py).
        route_cpu_gemms(self)

    # ---- helpers -------------------------------------------------------------------------
    def _local_image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> bool [s_local, b, 1] in the activation layout of this rank."""
        mask = (input_ids >= self.model_cfg.text_vocab_size).transpose(0, 1)
        if self.config.sequence_parallel:
            tp = self.pg_collection.tp
            chunk = mask.shape[0] // tp.size()
            mask = mask[tp.rank() * chunk : (tp.rank() + 1) * chunk]
        return mask.unsqueeze(-1).contiguous()

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        v = self.model_cfg.text_vocab_size
        text = self.embedding(input_ids=input_ids.clamp(max=v - 1), position_ids=position_ids)
        image = self.image_embedding(
            input_ids=(input_ids - v).clamp(min=0), position_ids=position_ids
        )
        return torch.where(self.image_positions.mask, image, text)

    def _mask_from(self, logits: torch.Tensor, first: int) -> torch.Tensor:
        """Vocab-parallel logits with every global column >= `first` at -inf."""
        part = logits.shape[-1]
        start = self.pg_collection.tp.rank() * part
        cols = torch.arange(start, start + part, device=logits.device)
        return logits.masked_fill(cols >= first, float("-inf"))

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel text-head logits with the padding rows (`text_vocab_padding`) at -inf."""
        logits, _ = self.output_layer(hidden)
        pad = self.model_cfg.text_vocab_padding
        return self._mask_from(logits, self.model_cfg.text_vocab_size - pad) if pad else logits

    def _image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel image-head logits with the spare slots (>= image_vocab_size) at -inf."""
        logits, _ = self.image_output_layer(hidden)
        return self._mask_from(logits, self.model_cfg.image_vocab_size)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        loss_mask: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        logits_from: int = 0,
        only_head: Optional[str] = None,
        **unused,
    ):
        """Per-token loss [b, s] when `labels` is given, else (text_logits, image_logits).

        Logits are [b, s, vocab/TP] (vocab-parallel) unless `runtime_gather_output` is True.
        Scoring callers (RL log-probs) may skip head work nobody reads:
        - `logits_from`: heads (and loss) only at positions >= logits_from: outputs are [b, s - logits_from, ..];
        - `only_head` "text" / "image": only that head; the other logits are None and, with `labels`,
          positions whose target is of the other modality get loss 0.
        """
        self.image_positions.mask = self._local_image_mask(input_ids)
        if decoder_input is None and self.pre_process:
            decoder_input = self._embed(input_ids, position_ids)
        preproc = self._preprocess(
            input_ids=input_ids,
            position_ids=position_ids,
            decoder_input=decoder_input,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
        )
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, seq_len_offset, _ = preproc[:6]
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=seq_len_offset,
        )
        if not self.post_process:
            return hidden
        if inference_context is not None and not self.training:
            if inference_context.materialize_only_last_token_logits:
                hidden = hidden[-1:]
            runtime_gather_output = True
        if only_head not in (None, TEXT, IMAGE):
            raise ValueError(f"only_head must be None, 'text' or 'image', got {only_head!r}")
        if logits_from:
            if self.config.sequence_parallel:  # hidden is this rank's sequence chunk here
                raise ValueError("logits_from needs sequence_parallel=False")
            hidden = hidden[logits_from:]
            labels = None if labels is None else labels[:, logits_from:]
        text_logits = self._text_logits(hidden) if only_head != IMAGE else None
        image_logits = self._image_logits(hidden) if only_head != TEXT else None
        if labels is None:
            out = []
            for logits in (text_logits, image_logits):
                if logits is not None and runtime_gather_output:
                    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.pg_collection.tp)
                out.append(None if logits is None else logits.transpose(0, 1).contiguous())
            return tuple(out)
        return self.modality_loss(labels, text_logits, image_logits)

    def modality_loss(self, labels, text_logits, image_logits, batch_first: bool = False) -> torch.Tensor:
        """Per-token cross entropy [b, s]; image targets use the image head, text the text head.

        Logits are [s, b, V/TP] ([b, s, V/TP] with `batch_first`, as a forward without labels returns
        them: no transposed copies); a head passed as None scores nothing (its targets get loss 0).
        """
        v = self.model_cfg.text_vocab_size
        if not batch_first:
            labels = labels.transpose(0, 1).contiguous()  # [s, b]
        is_image = labels >= v
        zero = None
        # contiguous(): callers may pass [s, b, V] views of [b, s, V] logits (a no-op otherwise).
        if text_logits is not None:
            text_loss = tensor_parallel.vocab_parallel_cross_entropy(
                text_logits.float().contiguous(), torch.where(is_image, 0, labels)
            )
            zero = torch.zeros_like(text_loss)
        if image_logits is not None:
            image_loss = tensor_parallel.vocab_parallel_cross_entropy(
                image_logits.float().contiguous(), torch.where(is_image, labels - v, 0)
            )
            zero = torch.zeros_like(image_loss)
        if text_logits is None:
            text_loss = zero
        if image_logits is None:
            image_loss = zero
        loss = torch.where(is_image, image_loss, text_loss)
        return loss if batch_first else loss.transpose(0, 1).contiguous()


def mode_logits(text_logits: torch.Tensor, image_logits: torch.Tensor, mode: str, image_vocab_size: int):
    """Full-vocabulary logits [.., V + image_table] as X-Omni's released model returns them.

    Text mode: text-head logits, everything else the dtype's minimum. Image mode: the first
    `image_vocab_size` image-head logits at ids V + k, everything else the minimum.
    Expects gathered (non-vocab-parallel) logits.
    """
    if mode not in (TEXT, IMAGE):
        raise ValueError(f"mode must be 'text' or 'image', got {mode!r}")
    v = text_logits.shape[-1]
    out = text_logits.new_full((*text_logits.shape[:-1], v + image_logits.shape[-1]), torch.finfo(text_logits.dtype).min)
    if mode == TEXT:
        out[..., :v] = text_logits
    else:
        out[..., v : v + image_vocab_size] = image_logits[..., :image_vocab_size]
    return out
