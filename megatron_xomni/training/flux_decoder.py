"""Train the semantic FLUX decoder with rectified-flow (flow-matching) loss, on the shared substrate.

Pairs are (pixels in [-1, 1], condition features [B, h*w, adapter_dim]) where the features are the
frozen tokenizer's ``decode_features(encode(pixels))``. Data parallel with FSDP2 (``fully_shard``)
on CUDA (bf16 compute, fp32 master weights and reductions) and on CPU with gloo (fp32).
Checkpoints (torch DCP of the trainable parameters and AdamW state), metrics, preemption and the LR
schedule are the trainers' shared substrate (training/checkpoint.py, metrics.py, preemption.py,
schedule.py); the diffusers-format export lands in <save_dir>/export.

Determinism: every random draw of a step (noise, timesteps, CFG dropout) comes from a generator
seeded by (seed, step, global sample index), so a run is bit-identical whatever the world size's
effect on batching, and a resumed run continues exactly where the checkpoint left off.

    torchrun --nproc-per-node 2 -m megatron_xomni.train tiny_decoder steps=200 save_dir=runs/dec image_tokenizer=...
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_xomni.checkpointing import read_metadata
from megatron_xomni.data.corpus_source import BatchShape, image_text_source, pil_to_pixels  # noqa: F401 (pil_to_pixels re-exported)
from megatron_xomni.data.image_grid import ImageGrid
from megatron_xomni.data.preprocess import ImagePreprocessConfig
from megatron_xomni.models.flux_decoder.config import (TOKEN_PIXELS, DecoderConfig, decoder_adapter_dim,  # noqa: F401
                                                       decoder_config)
from megatron_xomni.models.flux_decoder.model import NEW_PARAMS, XOmniDecoder, build_decoder
from megatron_xomni.models.flux_decoder.sampling import features_for_decoder, flux_mu, make_scheduler, sample
from megatron_xomni.training import faults
from megatron_xomni.training.checkpoint import CheckpointManager, DCPPayload
from megatron_xomni.models.flux_decoder.export import export_decoder
from megatron_xomni.training.metrics import MetricsLogger
from megatron_xomni.training.optim import OptimConfig
from megatron_xomni.training.preemption import PreemptionSignal
from megatron_xomni.training.run import EXIT_OK, EXIT_REQUEUE, InputError, RunSection
from megatron_xomni.training.schedule import ScheduleConfig, build_scheduler


@dataclass
class DecoderRunConfig(RunSection):
    """One decoder training run (the run section's fields come first)."""

    RUNNER: ClassVar[str] = "megatron_xomni.training.flux_decoder:run"

    name: str = "decoder"
    steps: int = 200
    save_dir: str = "runs/decoder"
    save_interval: int = 100
    keep_last: Optional[int] = 2
    log_interval: int = 10
    seed: int = 0
    preset: str = "tiny"
    """Decoder preset ("tiny" or "xomni": FLUX.1-dev sized) used when init_from is None."""
    variant: Literal["text", "image"] = "image"
    """Decoder variant; a resumed checkpoint or init_from export must match it."""
    init_from: Optional[str] = None
    """An XOmniDecoder export to start from (e.g. with a fitted tiny VAE); None = build_decoder(preset)."""
    pretrained_path: Optional[str] = None
    """Local FLUX.1-dev folder for the xomni preset (ignored when init_from is set)."""
    image_tokenizer: str = "tiny"
    """The frozen SigLIP-VQ tokenizer giving the condition features: a save_pretrained folder, or a
    preset name (random init) for tests and smoke runs."""
    trainable: Literal["semantic_proj", "all"] = "all"
    """"semantic_proj": only the new parameters (semantic_proj, plus the image variant's pooled
    embedding) train and FLUX stays frozen; "all": the whole transformer trains."""
    batch_size: int = 16
    """Global batch size (split evenly across data-parallel ranks)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-3, weight_decay=0.0, clip_grad=1.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(style="constant", warmup_steps=10))
    cfg_dropout: float = 0.1
    """Probability that a sample's features are zeroed (and prompt emptied) so decoder CFG has a
    trained negative branch."""
    logit_normal_std: float = 1.0
    """Timesteps: sigmoid(N(0, std)) then FLUX's resolution shift, matching where the sampler spends its steps."""
    corpus: str = "world"
    """Training images: "world" (the built-in world, rendered at image_size) or a WebDataset corpus
    directory (`xomni corpus` builds one from a folder of images with .txt captions or a JSONL)."""
    preprocess: Literal["auto", "fixed", "xomni"] = "auto"
    """"fixed": image_size squares (cover-resize, centre-crop); "xomni": X-Omni's any-res rules, each
    batch at the size of its first image; "auto": fixed for the tiny preset, xomni otherwise."""
    image_size: int = 64
    """Square training resolution in pixels for fixed preprocessing and the world (multiple of 16)."""
    sample_every: int = 100
    """TensorBoard reconstruction-image period (0 disables)."""
    sample_steps: int = 8
    """Euler steps for the logged reconstructions."""
    export: bool = True
    """Write a diffusers-format export to <save_dir>/export at the end."""
    decoder_overrides: dict = field(default_factory=dict)
    """Extra DecoderConfig fields for the preset (e.g. adapter_dim)."""
    vae_fit_steps: int = 0
    """Tiny preset without init_from: fit the (random) tiny VAE on training crops for this many steps
    before training, so latents mean something; the fitted decoder is saved to <save_dir>/init and
    reused on resume. 0 keeps the VAE as built (FLUX's VAE is used as released)."""
    vae_fit_lr: float = 2e-3
    """Adam learning rate of that VAE fit."""

    def validate(self, world_size: int = 1) -> None:
        """Types and sizes (no paths, no process groups)."""
        from megatron_xomni.dataclass_utils import check_numbers

        self.validate_run()
        self.optim.validate()
        self.schedule.validate(self.steps)
        check_numbers({"batch_size": self.batch_size, "image_size": self.image_size, "sample_steps": self.sample_steps}, 1)
        check_numbers({"sample_every": self.sample_every, "vae_fit_steps": self.vae_fit_steps}, 0)
        check_numbers({"vae_fit_lr": self.vae_fit_lr}, 0, integer=False)
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the {world_size} data-parallel ranks")
        if self.variant not in ("text", "image"):
            raise ValueError(f"variant={self.variant!r}: use text or image")
        if self.trainable not in ("semantic_proj", "all"):
            raise ValueError(f"trainable must be 'semantic_proj' or 'all', got {self.trainable!r}")
        if self.preprocess not in ("auto", "fixed", "xomni"):
            raise ValueError(f"preprocess={self.preprocess!r}: choose auto, fixed or xomni")
        ImageGrid.from_pixels(self.image_size, self.image_size, TOKEN_PIXELS, what="image_size")
        if self.vae_fit_steps and self.preset != "tiny":
            raise ValueError("vae_fit_steps is for the tiny preset; the xomni preset uses FLUX's released VAE")

    def check_paths(self) -> None:
        for name in ("init_from", "pretrained_path"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise InputError(f"{name}={value} does not exist: fix the path")
        if self.image_tokenizer not in ("tiny", "xomni") and not Path(self.image_tokenizer).is_dir():
            raise InputError(f"image_tokenizer={self.image_tokenizer} is not a folder: train the SigLIP-VQ "
                             "tokenizer first (xomni train tiny_siglip_vq) or fix the path")
        if self.corpus != "world" and not Path(self.corpus).is_dir():
            raise InputError(f"corpus={self.corpus} is not a folder: build one with xomni corpus, or use corpus=world")


# ----------------------------------------------------------------------------- data
def batch_shape(cfg: DecoderRunConfig) -> BatchShape:
    mode = cfg.preprocess if cfg.preprocess != "auto" else ("fixed" if cfg.preset == "tiny" else "xomni")
    if mode not in ("fixed", "xomni"):
        raise ValueError(f"preprocess={cfg.preprocess!r}: choose auto, fixed or xomni")
    return BatchShape.fixed(cfg.image_size) if mode == "fixed" else BatchShape.xomni(ImagePreprocessConfig())


def training_source(cfg: DecoderRunConfig):
    """The image-text source `cfg.corpus` names (data/corpus_source.py), seeded by `cfg.seed`."""
    return image_text_source(cfg.corpus, seed=cfg.seed, size=cfg.image_size)


@torch.no_grad()
def tokenizer_features(tokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen tokenizer's condition features on the decoder's grid: decode_features(encode(pixels)),
    folded when the tokenizer's patch is finer than the 16 px decoder token (features_for_decoder)."""
    return features_for_decoder(tokenizer, tokenizer.encode(pixels))[0].float()


def source_batches(tokenizer, cfg: DecoderRunConfig, rank: int = 0, world_size: int = 1, start_step: int = 0,
                   source=None) -> Iterator[dict]:
    """Endless batches of this rank from the training source: step s holds global records
    s*B .. s*B+B-1 (rank r its contiguous slice), so a resumed run starts at its step directly."""
    source = source or training_source(cfg)
    for b in source.batches(cfg.batch_size, batch_shape(cfg), rank, world_size, start_step):
        yield {"pixels": b["pixels"], "features": tokenizer_features(tokenizer, b["pixels"]), "prompts": b["prompts"],
               "index": b["index"]}


# ----------------------------------------------------------------------------- loss
def _sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 1_000_003 + index)


def flow_matching_loss(decoder: XOmniDecoder, batch: dict, step: int, cfg: DecoderRunConfig, dtype) -> torch.Tensor:
    """Rectified flow: x_t = (1 - s) x0 + s eps, target velocity eps - x0 (what FLUX's Euler sampler integrates)."""
    device = next(decoder.transformer.parameters()).device
    feats = batch["features"]
    if feats.ndim != 3 or feats.shape[2] != decoder.cfg.adapter_dim:
        raise ValueError(
            f"condition features must be [B, h*w, {decoder.cfg.adapter_dim}], got {tuple(feats.shape)}; wrong tokenizer?"
        )
    x0 = batch.get("latents")
    if x0 is None:
        x0 = decoder.encode_pixels(batch["pixels"].to(device))
    h, w = ImageGrid.from_pixels(batch["pixels"].shape[2], batch["pixels"].shape[3], decoder.cfg.token_pixels).shape
    decoder.check_grid((h, w), feats.shape[1])
    x0 = x0.to(device=device, dtype=torch.float32)
    b = x0.shape[0]
    index = batch.get("index", torch.arange(b))
    gens = [_sample_generator(cfg.seed, step, int(i)) for i in index]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
    u = torch.stack([torch.randn((), generator=g) for g in gens]) * cfg.logit_normal_std
    keep = torch.stack([torch.rand((), generator=g) for g in gens]) >= cfg.cfg_dropout
    sigma = make_scheduler(decoder.cfg).time_shift(flux_mu(decoder.cfg, h * w), 1.0, torch.sigmoid(u)).to(device)
    s = sigma.view(b, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    feats = feats.to(device) * keep.to(device).view(b, 1, 1)
    prompts = None
    if decoder.cfg.variant == "text":
        prompts = [p if k else "" for p, k in zip(batch.get("prompts") or [""] * b, keep.tolist())]
    text = decoder.prompt_inputs(prompts, b, device, dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not dist.is_initialized()):
        v = decoder.transformer(
            hidden_states=x_t.to(dtype), timestep=sigma.to(dtype), img_ids=decoder.image_ids((h, w), device, dtype),
            semantic_features=feats.to(dtype), guidance=_guidance(decoder, b, device, dtype), return_dict=False, **text,
        )[0]
    return F.mse_loss(v.float(), noise - x0)


def _guidance(decoder: XOmniDecoder, b: int, device, dtype):
    if not decoder.cfg.guidance_embeds:
        return None
    return torch.full((b,), decoder.cfg.embedded_guidance, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- setup
def select_trainable(decoder: XOmniDecoder, mode: str) -> list[str]:
    """Freeze everything but the chosen parameters; returns their names."""
    if mode not in ("semantic_proj", "all"):
        raise ValueError(f"trainable must be 'semantic_proj' or 'all', got {mode!r}")
    names = []
    for name, p in decoder.transformer.named_parameters():
        train = mode == "all" or name in NEW_PARAMS
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun env -> (rank, world_size, device); a plain process is rank 0 of 1 without a process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def shard(decoder: XOmniDecoder, device: torch.device) -> None:
    """FSDP2: one unit per FLUX block plus the root; bf16 params/compute and fp32 reductions on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mp_policy": mp} if mp is not None else {}
    t = decoder.transformer
    for block in [*t.transformer_blocks, *t.single_transformer_blocks]:
        fully_shard(block, **kw)
    fully_shard(t, **kw)


def load_init(cfg: DecoderRunConfig, tokenizer=None) -> XOmniDecoder:
    """The decoder to train. Built from the preset, it reads `tokenizer`'s features: its patch and
    adapter_dim x fold^2 (decoder_overrides win)."""
    if cfg.init_from:
        return XOmniDecoder.from_pretrained(cfg.init_from, variant=cfg.variant)
    init_dir = Path(cfg.save_dir) / "init"
    if cfg.vae_fit_steps > 0 and (init_dir / "decoder_config.json").exists():  # fitted earlier: resume from it
        return XOmniDecoder.from_pretrained(init_dir, variant=cfg.variant)
    fit = {}
    if tokenizer is not None:
        t = tokenizer.cfg
        fit = {"tokenizer_patch": int(t.patch_size), "adapter_dim": decoder_adapter_dim(t.adapter_dim, t.patch_size)}
    dcfg = decoder_config(cfg.preset, cfg.variant, pretrained_path=cfg.pretrained_path,
                          **{**fit, **cfg.decoder_overrides})
    decoder = build_decoder(dcfg, seed=cfg.seed)
    if cfg.vae_fit_steps > 0:
        pixels = training_source(cfg).gather(range(512), BatchShape.fixed(cfg.image_size))["pixels"]
        g = torch.Generator().manual_seed(cfg.seed)

        def crops():  # random 32 px crops: the VAE is convolutional, crops train it faster
            while True:
                idx = torch.randint(0, len(pixels), (16,), generator=g)
                y, x = torch.randint(0, cfg.image_size - 32 + 1, (2,), generator=g).tolist()
                yield pixels[idx][:, :, y:y + 32, x:x + 32]

        fit_vae(decoder, crops(), cfg.vae_fit_steps, lr=cfg.vae_fit_lr)
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fits identically (seeded); one saves
            decoder.save_pretrained(init_dir)
    return decoder


# ----------------------------------------------------------------------------- loop
def train(cfg: DecoderRunConfig, tokenizer=None, data: Iterable[dict] | None = None,
          held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Run (or resume from <save_dir>) training. Returns {"decoder", "losses", "step", "export",
    "data_report", "exit_code"}.

    ``data`` yields per-rank batches {"pixels", "features"[, "prompts", "latents", "index"]}; it is
    fast-forwarded by the resumed step count, so it must be deterministic for exact resume. Without
    ``data`` the images of ``cfg.corpus`` (the world or a corpus) are used with ``tokenizer`` (required
    then); their skip report is saved as <save_dir>/data_skips/rank<R>.json with every checkpoint.
    ``held_out``: (pixels, features) reconstructed into TensorBoard every ``sample_every`` steps.
    """
    rank, world, device = init_distributed()
    cfg.validate(world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoder = load_init(cfg, tokenizer)
    decoder.to(device)
    if device.type == "cuda":  # frozen parts run in bf16 too; trainable weights stay fp32 masters
        decoder.vae.to(dtype)
        if decoder.prompt_encoder is not None:
            decoder.prompt_encoder.to(dtype)
    trainable = select_trainable(decoder, cfg.trainable)
    if world > 1:
        shard(decoder, device)
    params = [p for p in decoder.transformer.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                            weight_decay=o.weight_decay)
    scheduler = build_scheduler(opt, cfg.schedule, o.lr, o.min_lr, o.weight_decay, cfg.steps)

    out = Path(cfg.save_dir)
    ckpt = CheckpointManager(cfg.save_dir, cfg.keep_last, cfg.debug_kill, layout={"world_size": world})
    payload = DCPPayload(decoder.transformer, opt, model_keys=set(trainable))
    start = 0
    resume = ckpt.latest()
    if resume is not None:
        saved = read_metadata(resume, "trainer_state") or {}
        if saved.get("variant") != cfg.variant:  # checked before reading tensors that would not fit
            raise InputError(f"checkpoint {resume} is a {saved.get('variant')!r} decoder run; this run trains "
                             f"{cfg.variant!r}: use a new save_dir")
        _, resumed = ckpt.load(resume, payload)
        state = resumed.trainer_state
        start = int(state["step"])
        scheduler.load_state_dict(state["scheduler"])
        for g in opt.param_groups:  # the recipe's Adam settings win over the checkpoint's (training/resume.py)
            g["betas"], g["eps"] = (o.adam_beta1, o.adam_beta2), o.adam_eps
    source = None
    if data is None:
        if tokenizer is None:
            raise ValueError("train() needs a frozen tokenizer (or a data iterable) to compute condition features")
        source = training_source(cfg)
        data_iter = source_batches(tokenizer, cfg, rank, world, start, source)
    else:
        data_iter = itertools.islice(iter(data), start, None)

    logger = MetricsLogger(str(out / "tensorboard"), str(out / "metrics.jsonl"), rank == 0,
                           name=cfg.name, total_steps=cfg.steps, start_step=start)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(cfg.to_json())
        if resume is not None:
            print(f"[{cfg.name}] resumed from {resume} at step {start}", flush=True)
    preempt = PreemptionSignal()
    losses: list[float] = []
    decoder.transformer.train()
    t_last, logged, exit_code, done = time.perf_counter(), start, EXIT_OK, start

    def save(step: int) -> None:
        ckpt.save(step, payload, cfg.to_dict(),
                  {"step": step, "variant": cfg.variant, "trainable": trainable, "scheduler": scheduler.state_dict()})
        if source is not None:
            source.report.save(out / "data_skips" / f"rank{rank}.json")

    for step in range(start, cfg.steps):
        batch = next(data_iter)
        loss = flow_matching_loss(decoder, batch, step, cfg, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad if o.clip_grad > 0 else float("inf"))
        opt.step()
        scheduler.step(increment=1)
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value = value / world
        losses.append(float(value))
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.steps:
            now = time.perf_counter()
            seconds = (now - t_last) / (done - logged)
            t_last, logged = now, done
            lr = opt.param_groups[0]["lr"]
            logger.log_step(done, {"train/loss": losses[-1], "train/lr": lr, "train/grad_norm": float(gnorm),
                                   "perf/sec_per_step": seconds},
                            [f"loss {losses[-1]:.4f}", f"lr {lr:.2e}", f"gnorm {float(gnorm):.3f}", f"{seconds:.2f} s/step"])
        if held_out is not None and cfg.sample_every and done % cfg.sample_every == 0:
            _log_samples(decoder, held_out, cfg, logger.writer, done)
        faults.fire("after_step", done, cfg.debug_kill)
        preempted = preempt.agreed()
        if preempted or done % cfg.save_interval == 0 or done == cfg.steps:
            save(done)
        if preempted:
            if rank == 0:
                print(f"[{cfg.name}] preemption signal: saved at step {done}, exiting for requeue", flush=True)
            exit_code = EXIT_REQUEUE
            break
    decoder.transformer.eval()
    if source is not None and source.report.num_skipped and rank == 0:
        print(f"[{cfg.name}] {cfg.corpus}, rank 0: {source.report}".replace("\n", "; "), flush=True)
    export = export_decoder(decoder, out / "export") if cfg.export and exit_code == EXIT_OK else None
    logger.close()
    return {"decoder": decoder, "losses": losses, "step": max(start, done), "export": export,
            "data_report": source.report if source is not None else None, "exit_code": exit_code}


def load_frozen_tokenizer(path_or_preset: str, seed: int = 0):
    """The frozen SigLIP-VQ tokenizer: a save_pretrained folder, or a preset (random init, seeded)."""
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    if path_or_preset in ("tiny", "xomni"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tok = SiglipVQTokenizer(tokenizer_config(path_or_preset))
    else:
        tok = SiglipVQTokenizer.from_pretrained(path_or_preset)
    return tok.eval().requires_grad_(False)


def run(cfg: DecoderRunConfig) -> int:
    """The stage's RUNNER (python -m megatron_xomni.train RECIPE): returns the exit code."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world)
    cfg.check_paths()
    try:
        result = train(cfg, load_frozen_tokenizer(cfg.image_tokenizer, cfg.seed))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return result["exit_code"]


def _log_samples(decoder, held_out, cfg: DecoderRunConfig, writer, step: int) -> None:
    pixels, feats = held_out
    h, w = ImageGrid.from_pixels(pixels.shape[2], pixels.shape[3], decoder.cfg.token_pixels).shape
    decoder.transformer.eval()
    recon = sample(decoder, feats, (h, w), num_inference_steps=cfg.sample_steps, generator=cfg.seed)  # all ranks (FSDP)
    decoder.transformer.train()
    if writer is not None:
        both = torch.cat([pixels.to(recon.device), recon]).add(1).div(2).clamp(0, 1)
        writer.add_images("samples/truth_then_reconstruction", both, step)


# ----------------------------------------------------------------------------- tiny VAE
def fit_vae(decoder: XOmniDecoder, pixel_batches: Iterable[torch.Tensor], steps: int, lr: float = 2e-3,
            kl_weight: float = 1e-6) -> list[float]:
    """Fit the decoder's VAE by reconstruction (tiny preset only; FLUX's VAE is used as released).

    Trained as the decoder uses it: through the posterior mean (encode_pixels never samples), with a
    tiny KL term that only keeps the latent scale bounded. Afterwards the latent shift/scale are
    calibrated to zero mean, unit variance on the last batch (FLUX's 0.1159/0.3611 play that role for
    its VAE), so flow matching starts from noise of the data's scale. Then the VAE is frozen again.
    """
    vae = decoder.vae
    vae.requires_grad_(True).train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    losses = []
    x = None
    for _, x in zip(range(steps), pixel_batches):
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.requires_grad_(False).eval()
    if x is not None:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        decoder.cfg.shift_factor = float(z.mean())
        decoder.cfg.scaling_factor = float(1.0 / z.std().clamp_min(1e-6))
    return losses


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
