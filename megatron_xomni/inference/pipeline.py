"""XOmniPipeline: text -> image and image -> text with a trained X-Omni model.

    from megatron_xomni.inference import XOmniPipeline
    from megatron_xomni.inference.sampling import SamplingConfig

    pipe = XOmniPipeline.from_bundle("bundle/")          # single process: parallel state is set up for you
    images = pipe.generate(["a red circle"], 64, 64, seeds=[0])           # list[PIL.Image] (rank 0)
    answer = pipe.chat(["photo.png"], "What color is the circle?")        # str

Under torchrun, call `initialize_parallel(ParallelConfig(tensor_parallel=N, ...))` first; the AR model
is built at that layout and loaded from the checkpoint (dist-ckpt reshards any saved layout). Every
rank must make the same calls with the same arguments. The image tokenizer and the diffusion decoder
live on global rank 0 only, which returns the images; other ranks return None.

Text -> image (X-Omni section 2/3): the prompt `caption <SOM>{h} {w}<IMAGE>` is extended by exactly
h*w image codes sampled from the image head (KV-cache generation of megatron_xomni.inference.generation), the codes become
adapter features (SiglipVQTokenizer.decode_features) and the FLUX-style decoder turns them into pixels.

Seeds: image k is fully determined by (prompt, seeds[k], settings): its AR random stream is the
per-sample stream named by seeds[k] and its decoder noise is drawn from a generator seeded with
seeds[k]. So an image reproduces on its own (same seed, one prompt) at any TP/PP/DP layout.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megatron_xomni.device import resolve_dtype  # also re-exported: its home is device.py
from megatron_xomni.inference.bundle import PipelinePaths, PipelineSpec, inspect_paths
from megatron_xomni.inference.render import Renderer, to_pil  # noqa: F401  (to_pil re-exported)

ImageLike = Union[str, os.PathLike, Image.Image]
Turn = Union[str, tuple[str, str]]


def init_process_group(parallel=None, seed: int = 1234):
    """initialize_parallel(parallel) (default TP=PP=1); a plain `python` process (no torchrun environment)
    becomes a one-rank world on a free local port."""
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel, single_process_env

    single_process_env()
    return initialize_parallel(parallel or ParallelConfig(), seed=seed)


def _seeds(seeds: int | Sequence[int], n: int) -> list[int]:
    """int s -> s, s+1, ... (one per prompt); a sequence must have one non-negative seed per prompt."""
    out = [int(seeds) + i for i in range(n)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if len(out) != n:
        raise ValueError(f"got {len(out)} seeds for {n} prompts: pass one seed per prompt (or one int)")
    if any(s < 0 or s >= 2**63 for s in out):
        raise ValueError("seeds must lie in [0, 2**63)")
    return out


class XOmniPipeline:
    """AR model (at the current TP/PP layout) + text tokenizer + image tokenizer + diffusion decoder."""

    def __init__(self, spec: PipelineSpec, chunks: list, pg, image_tokenizer=None, decoder=None,
                 preprocess: str = "auto", format_overrides: Optional[dict] = None, max_rows_per_forward: int = 16):
        """Use `from_pretrained` / `from_bundle` / `from_spec`; this wires already loaded parts together."""
        from megatron_xomni.data.sequence import SequenceFormat

        self.spec = spec
        self.chunks = chunks
        self.pg = pg
        self.text_tokenizer = spec.text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.decoder = decoder
        self.model_config = spec.model_config
        self.preprocess = spec.preprocess_config(preprocess)
        self.format = SequenceFormat(text_vocab_size=self.model_config.text_vocab_size,
                                     image_vocab_size=self.model_config.image_vocab_size, **(format_overrides or {}))
        self.max_rows_per_forward = int(max_rows_per_forward)
        self.device = next(chunks[0].parameters()).device
        self.renderer = None
        if decoder is not None and image_tokenizer is not None:
            self.renderer = Renderer(image_tokenizer, decoder, batch_size=self.max_rows_per_forward)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str, text_tokenizer: str, image_tokenizer: str, decoder: Optional[str] = None,
                        *, iteration: Optional[int] = None, **kwargs) -> "XOmniPipeline":
        """Load from explicit paths (see PipelinePaths); kwargs go to `from_spec`."""
        spec = inspect_paths(PipelinePaths(model, text_tokenizer, image_tokenizer, decoder, iteration))
        return cls.from_spec(spec, **kwargs)

    @classmethod
    def from_bundle(cls, bundle: str, iteration: Optional[int] = None, **kwargs) -> "XOmniPipeline":
        spec = inspect_paths(PipelinePaths.from_bundle(bundle, iteration, require_decoder=False))
        return cls.from_spec(spec, **kwargs)

    @classmethod
    def from_spec(cls, spec: PipelineSpec, pg=None, dtype: str | torch.dtype = "auto", preprocess: str = "auto",
                  load_decoder: bool = True, format_overrides: Optional[dict] = None,
                  max_rows_per_forward: int = 16) -> "XOmniPipeline":
        """Build the AR model at the current layout and load every part (the image tokenizer and decoder
        on global rank 0 only). Without an initialised parallel state a single-process one is created."""
        from megatron.core import parallel_state as ps
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_xomni.models.xomni.checkpoint import current_layout, load_xomni

        spec.preprocess_config(preprocess)  # fail on a bad name before loading anything
        if not ps.model_parallel_is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) != 1:
                raise ValueError("call initialize_parallel(ParallelConfig(...)) on every rank before loading the pipeline")
            pg = init_process_group()
        pg = pg or ProcessGroupCollection.use_mpu_process_groups()
        current_layout().validate_for(spec.model_config, torch.distributed.get_world_size(), decoding=True)
        torch_dtype = resolve_dtype(dtype)
        chunks, _ = load_xomni(spec.checkpoint, pg=pg, dtype=torch_dtype, model_config=spec.model_config)
        device = next(chunks[0].parameters()).device
        for c in chunks:
            c.requires_grad_(False)
        image_tok = decoder = None
        if torch.distributed.get_rank() == 0:
            from megatron_xomni.models.siglip_vq import SiglipVQTokenizer

            image_tok = SiglipVQTokenizer.from_pretrained(spec.paths.image_tokenizer, device=device)
            image_tok.eval().requires_grad_(False)
            if load_decoder and spec.paths.decoder is not None:
                from megatron_xomni.models.flux_decoder import XOmniDecoder

                decoder = XOmniDecoder.from_pretrained(spec.paths.decoder, torch_dtype=torch_dtype)
                decoder.to(device).eval().requires_grad_(False)
        return cls(spec, chunks, pg, image_tok, decoder, preprocess, format_overrides, max_rows_per_forward)

    @property
    def is_output_rank(self) -> bool:
        """Global rank 0: holds the image tokenizer and decoder and returns images / writes files."""
        return torch.distributed.get_rank() == 0

    # ------------------------------------------------------------------ text -> image
    def prompt_ids(self, prompt: str, grid: tuple[int, int]) -> list[int]:
        """`prompt <SOM>{h} {w}<IMAGE>` as token ids (the caller picks the resolution, as X-Omni does)."""
        tok = self.text_tokenizer
        h, w = grid
        return tok.encode(prompt) + [tok.som_id] + tok.encode(f"{h} {w}") + [tok.image_id]

    def generate_codes(self, prompts: Sequence[str], height: int, width: int, seeds: int | Sequence[int] = 0,
                       sampling=None, cfg_scale: float = 1.0) -> list[torch.Tensor]:
        """Image codes [h, w] (long, CPU) for every prompt, on every rank.

        Prompts are split contiguously over data-parallel replicas and gathered back, so each replica
        samples only its share. `sampling`: SamplingConfig (default: X-Omni's T=1.0, min-p 0.03).
        `cfg_scale` != 1 adds the unconditional branch (empty prompt + the same image prefix).
        """
        from megatron_xomni.inference.generation import RolloutConfig, generate_images
        from megatron_xomni.inference.sampling import SamplingConfig

        prompts = list(prompts)
        grid = self.spec.check_prompts(prompts, height, width)
        seeds = _seeds(seeds, len(prompts))
        dp, dp_rank = self.pg.dp.size(), self.pg.dp.rank()
        per = -(-len(prompts) // dp)
        mine = list(range(dp_rank * per, min(len(prompts), (dp_rank + 1) * per)))
        cfg = RolloutConfig(sampling=sampling or SamplingConfig(), samples_per_prompt=1, seed=0,
                            cfg_scale=float(cfg_scale), max_rows_per_forward=self.max_rows_per_forward)
        uncond = self.prompt_ids("", grid) if cfg.cfg_scale != 1.0 else None
        codes: list[torch.Tensor] = []
        if mine:
            # prompt_id = the image's seed, G = 1: the sample's random stream is named by its seed alone.
            rolls = generate_images(self.chunks, self.pg, [self.prompt_ids(prompts[i], grid) for i in mine], grid,
                                    self.text_tokenizer.eom_id, cfg, prompt_ids=[seeds[i] for i in mine],
                                    uncond_prompt=uncond)
            codes = [r.codes.reshape(grid).cpu() for r in rolls]
        if dp > 1:
            parts: list = [None] * dp
            torch.distributed.all_gather_object(parts, [c.tolist() for c in codes], group=self.pg.dp)
            codes = [torch.tensor(c, dtype=torch.long) for part in parts for c in part]
        return codes

    def decode_codes(self, codes: Sequence[torch.Tensor], prompts: Sequence[str], seeds: Sequence[int],
                     decoder_steps: Optional[int] = None, decoder_guidance: float = 1.0) -> list[Image.Image]:
        """Codes [h, w] -> images with the diffusion decoder (output rank only). Codes of one call share a grid."""
        if self.renderer is None:
            raise ValueError("this rank holds no decoder: decode on global rank 0 of a pipeline loaded with a decoder")
        return self.renderer(codes, seeds, prompts, steps=decoder_steps, guidance=decoder_guidance)

    def generate(self, prompts: Sequence[str], height: int, width: int, seeds: int | Sequence[int] = 0,
                 sampling=None, cfg_scale: float = 1.0, decoder_steps: Optional[int] = None,
                 decoder_guidance: float = 1.0) -> Optional[list[Image.Image]]:
        """One image per prompt (repeat a prompt with other seeds for more). Images on rank 0, None elsewhere."""
        if self.spec.decoder_config is None:
            raise ValueError("generating images needs a decoder: load the pipeline with a decoder path")
        prompts = list(prompts)
        seed_list = _seeds(seeds, len(prompts))
        codes = self.generate_codes(prompts, height, width, seed_list, sampling, cfg_scale)
        if not self.is_output_rank:
            return None
        return self.decode_codes(codes, prompts, seed_list, decoder_steps, decoder_guidance)

    # ------------------------------------------------------------------ image -> text
    @staticmethod
    def _clean(text: str, what: str) -> str:
        from megatron_xomni.data.text_tokenizer import SPECIAL_TOKENS

        if not isinstance(text, str):
            raise ValueError(f"{what} must be text, got {type(text).__name__}")
        for special in SPECIAL_TOKENS:
            if special in text:
                raise ValueError(f"{what} contains the reserved token {special!r}; remove it from the text")
        return text

    def encode_images(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Image codes [h, w] of each input (preprocessed with the pipeline's rules), on every rank.

        Rank 0 encodes and broadcasts, so all ranks condition on bit-identical codes."""
        payload: list = [None]
        if self.is_output_rank:
            from megatron_xomni.data.decode import open_image_file
            from megatron_xomni.data.preprocess import preprocess, target_size

            out = []
            for n, img in enumerate(images):
                if isinstance(img, (str, os.PathLike)):
                    # header first: a missing/empty/foreign file, one above the pixel cap or outside the
                    # size rules is refused before its pixels are decoded
                    with open_image_file(img, self.preprocess.max_pixels) as im:
                        try:
                            target_size(im.height, im.width, self.preprocess)
                        except ValueError as e:
                            raise ValueError(f"image {img}: {e}") from None
                        img = im.convert("RGB")
                if not isinstance(img, Image.Image):
                    raise ValueError(f"image {n} is a {type(img).__name__}: pass a path or a PIL image")
                pixels = preprocess(img, self.preprocess).unsqueeze(0).to(self.device)
                with torch.no_grad():
                    out.append(self.image_tokenizer.encode(pixels)[0].cpu().numpy())
            payload = [out]
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(payload, src=0)
        return payload[0]

    def chat_turns(self, images: Sequence[ImageLike], turns: Sequence[Turn] | str, max_new_tokens: int = 256,
                   sampling=None, seed: int = 0) -> list[str]:
        """Answers to each question of a conversation about `images`.

        The context is the understanding format of training: `<SOM>{h} {w}<IMAGE> codes <EOM>` per image,
        then `q1 sep a1 turn_sep q2 sep a2 ...`. A turn is a question (answered by the model, text mode until
        EOS or max_new_tokens) or a (question, answer) pair taken as given history. `sampling` None = greedy.
        """
        from megatron_xomni.inference.generation import RolloutConfig, generate_text
        from megatron_xomni.inference.sampling import SamplingConfig
        from megatron_xomni.data.sequence import image_block_ids

        if isinstance(turns, str):
            turns = [turns]
        if not turns:
            raise ValueError("chat needs at least one question")
        tok, fmt = self.text_tokenizer, self.format
        ids: list[int] = []
        for codes in self.encode_images(list(images)):
            header, body, eom = image_block_ids(tok, fmt, codes)
            ids += header + body + [eom]
        cfg = RolloutConfig(sampling=sampling or SamplingConfig(temperature=0.0), samples_per_prompt=1, seed=int(seed),
                            max_rows_per_forward=1)
        limit = int(self.model_config.max_position_embeddings)
        answers = []
        for n, turn in enumerate(turns):
            question, given = (turn, None) if isinstance(turn, str) else turn
            q = self._clean(question, f"question {n}")
            ids += tok.encode((fmt.turn_separator if n else "") + q + fmt.qa_separator)
            if given is not None:
                ids += tok.encode(self._clean(given, f"answer {n}"))
                answers.append(given)
                continue
            budget = min(int(max_new_tokens), limit - len(ids))
            if budget < 1:
                raise ValueError(f"the conversation already fills {len(ids)} of the model's {limit} positions: "
                                 "use fewer/smaller images or fewer turns")
            (roll,) = generate_text(self.chunks, self.pg, [ids], budget, tok.eos_id, cfg, prompt_ids=[n])
            new = roll.tokens[roll.prompt_length:].tolist()
            if new and new[-1] == tok.eos_id:
                new = new[:-1]
            ids += new
            # Rows of the model's text table beyond the tokenizer (padding) have no text: drop them.
            answers.append(tok.decode([i for i in new if i < tok.vocab_size]))
        return answers

    def chat(self, images: Sequence[ImageLike], question_turns: Sequence[Turn] | str, max_new_tokens: int = 256,
             sampling=None, seed: int = 0) -> str:
        """The answer to the last question (earlier questions are answered first and kept as context)."""
        return self.chat_turns(images, question_turns, max_new_tokens, sampling, seed)[-1]
