"""Train the semantic FLUX decoder with rectified-flow (flow-matching) loss.

Pairs are (pixels in [-1, 1], condition features [B, h*w, adapter_dim]) where the features are the
frozen tokenizer's ``decode_features(encode(pixels))``. Data parallel with FSDP2 (``fully_shard``)
on CUDA (bf16 compute, fp32 master weights and reductions) and on CPU with gloo (fp32).

Determinism: every random draw of a step (noise, timesteps, CFG dropout) comes from a generator
seeded by (seed, step, global sample index), so a run is bit-identical whatever the world size's
effect on batching, and a resumed run continues exactly where the checkpoint left off.

    torchrun --nproc-per-node 2 -m megatron_xomni.training.flux_decoder --preset tiny --steps 200 --out runs/dec
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_xomni.data.corpus_source import BatchShape, image_text_source, pil_to_pixels  # noqa: F401 (pil_to_pixels re-exported)
from megatron_xomni.data.preprocess import ImagePreprocessConfig
from megatron_xomni.training.flux_decoder_checkpoint import export_decoder, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_xomni.models.flux_decoder.config import TOKEN_PIXELS, DecoderConfig, decoder_config
from megatron_xomni.models.flux_decoder.model import NEW_PARAMS, XOmniDecoder, build_decoder
from megatron_xomni.models.flux_decoder.sampling import flux_mu, make_scheduler, sample


@dataclass
class TrainConfig:
    """One decoder training run."""

    preset: str = "tiny"
    """Decoder preset ("tiny" or "full") used when init_from is None."""
    variant: Literal["text", "image"] = "image"
    """Decoder variant; a resumed checkpoint or init_from export must match it."""
    init_from: str | None = None
    """An XOmniDecoder export to start from (e.g. with a fitted tiny VAE); None = build_decoder(preset)."""
    pretrained_path: str | None = None
    """Local FLUX.1-dev folder for the full preset (ignored when init_from is set)."""
    trainable: Literal["semantic_proj", "all"] = "all"
    """"semantic_proj": only the new parameters (semantic_proj, plus the image variant's pooled
    embedding) train and FLUX stays frozen; "all": the whole transformer trains."""
    steps: int = 200
    """Optimizer steps to reach (a resumed run continues up to this step)."""
    batch_size: int = 16
    """Global batch size (split evenly across data-parallel ranks)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (constant after warmup)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
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
    seed: int = 0
    """Seeds the model init, data order and every training draw."""
    out_dir: str = "runs/decoder"
    """Checkpoints, TensorBoard logs and the final export go here."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir/checkpoints if one exists."""
    ckpt_every: int = 100
    """Checkpoint period in steps (a checkpoint is also written at the last step)."""
    log_every: int = 10
    """TensorBoard scalar period."""
    sample_every: int = 100
    """TensorBoard reconstruction-image period (0 disables)."""
    sample_steps: int = 8
    """Euler steps for the logged reconstructions."""
    export: bool = True
    """Write a diffusers-format export to out_dir/export at the end."""
    decoder_overrides: dict = field(default_factory=dict)
    """Extra DecoderConfig fields for the preset (e.g. adapter_dim)."""
    vae_fit_steps: int = 0
    """Tiny preset without init_from: fit the (random) tiny VAE on built-in world crops for this many
    steps before training, so latents mean something; the fitted decoder is saved to
    out_dir/init and reused on resume. 0 keeps the VAE as built (FLUX's VAE is used as released)."""


# ----------------------------------------------------------------------------- data
def batch_shape(cfg: TrainConfig) -> BatchShape:
    mode = cfg.preprocess if cfg.preprocess != "auto" else ("fixed" if cfg.preset == "tiny" else "xomni")
    if mode not in ("fixed", "xomni"):
        raise ValueError(f"preprocess={cfg.preprocess!r}: choose auto, fixed or xomni")
    return BatchShape.fixed(cfg.image_size) if mode == "fixed" else BatchShape.xomni(ImagePreprocessConfig())


def training_source(cfg: TrainConfig):
    """The image-text source `cfg.corpus` names (data/corpus_source.py), seeded by `cfg.seed`."""
    return image_text_source(cfg.corpus, seed=cfg.seed, size=cfg.image_size)


@torch.no_grad()
def tokenizer_features(tokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen tokenizer's condition features: decode_features(encode(pixels))."""
    return tokenizer.decode_features(tokenizer.encode(pixels)).float()


def source_batches(tokenizer, cfg: TrainConfig, rank: int = 0, world_size: int = 1, start_step: int = 0,
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


def flow_matching_loss(decoder: XOmniDecoder, batch: dict, step: int, cfg: TrainConfig, dtype) -> torch.Tensor:
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
    h, w = batch["pixels"].shape[2] // TOKEN_PIXELS, batch["pixels"].shape[3] // TOKEN_PIXELS
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


def load_init(cfg: TrainConfig) -> XOmniDecoder:
    if cfg.init_from:
        return XOmniDecoder.from_pretrained(cfg.init_from, variant=cfg.variant)
    init_dir = Path(cfg.out_dir) / "init"
    if cfg.vae_fit_steps > 0 and (init_dir / "decoder_config.json").exists():  # fitted earlier: resume from it
        return XOmniDecoder.from_pretrained(init_dir, variant=cfg.variant)
    dcfg = decoder_config(cfg.preset, cfg.variant, pretrained_path=cfg.pretrained_path, **cfg.decoder_overrides)
    decoder = build_decoder(dcfg, seed=cfg.seed)
    if cfg.vae_fit_steps > 0:
        if cfg.preset != "tiny":
            raise ValueError("vae_fit_steps is for the tiny preset; the full preset uses FLUX's released VAE")
        pixels = training_source(cfg).gather(range(512), BatchShape.fixed(cfg.image_size))["pixels"]
        g = torch.Generator().manual_seed(cfg.seed)

        def crops():  # random 32 px crops: the VAE is convolutional, crops train it faster
            while True:
                idx = torch.randint(0, len(pixels), (16,), generator=g)
                y, x = torch.randint(0, cfg.image_size - 32 + 1, (2,), generator=g).tolist()
                yield pixels[idx][:, :, y:y + 32, x:x + 32]

        fit_vae(decoder, crops(), cfg.vae_fit_steps)
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fits identically (seeded); one saves
            decoder.save_pretrained(init_dir)
    return decoder


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


# ----------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, tokenizer=None, data: Iterable[dict] | None = None,
          held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Run (or resume) training. Returns {"decoder", "losses", "step", "export"}.

    ``data`` yields per-rank batches {"pixels", "features"[, "prompts", "latents", "index"]}; it is
    fast-forwarded by the resumed step count, so it must be deterministic for exact resume. Without
    ``data`` the images of ``cfg.corpus`` (the world or a corpus) are used with ``tokenizer`` (required
    then); their skip report is saved as out_dir/data_skips/rank<R>.json with every checkpoint.
    ``held_out``: (pixels, features) reconstructed into TensorBoard every ``sample_every`` steps.
    """
    rank, world, device = init_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} data-parallel ranks")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoder = load_init(cfg)
    decoder.to(device)
    if device.type == "cuda":  # frozen parts run in bf16 too; trainable weights stay fp32 masters
        decoder.vae.to(dtype)
        if decoder.prompt_encoder is not None:
            decoder.prompt_encoder.to(dtype)
    trainable = select_trainable(decoder, cfg.trainable)
    if world > 1:
        shard(decoder, device)
    params = [p for p in decoder.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    start = 0
    last = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if last is not None:
        start = load_checkpoint(last, decoder.transformer, opt, cfg.variant)
    source = None
    if data is None:
        if tokenizer is None:
            raise ValueError("train() needs a frozen tokenizer (or a data iterable) to compute condition features")
        source = training_source(cfg)
        data_iter = source_batches(tokenizer, cfg, rank, world, start, source)
    else:
        data_iter = itertools.islice(iter(data), start, None)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        (out / "train_config.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    meta = {"variant": cfg.variant, "train_config": dataclasses.asdict(cfg)}
    losses: list[float] = []
    decoder.transformer.train()
    t_last = time.perf_counter()
    for step in range(start, cfg.steps):
        batch = next(data_iter)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = flow_matching_loss(decoder, batch, step, cfg, dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)  # SUM: gloo has no AVG
            value = value / world
        losses.append(float(value))
        done = step + 1
        if writer is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            writer.add_scalar("train/loss", losses[-1], done)
            writer.add_scalar("train/lr", lr_at(cfg, step), done)
            writer.add_scalar("perf/sec_per_step", (now - t_last) / cfg.log_every, done)
            t_last = now
        if held_out is not None and cfg.sample_every and done % cfg.sample_every == 0:
            _log_samples(decoder, held_out, cfg, writer, done)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, done, decoder.transformer, opt, trainable, meta)
            if source is not None:
                source.report.save(out / "data_skips" / f"rank{rank}.json")
    decoder.transformer.eval()
    if source is not None and source.report.num_skipped and rank == 0:
        print(f"[decoder] {cfg.corpus}, rank 0: {source.report}".replace("\n", "; "), flush=True)
    export = export_decoder(decoder, out / "export") if cfg.export else None
    if writer is not None:
        writer.close()
    return {"decoder": decoder, "losses": losses, "step": max(start, cfg.steps), "export": export,
            "data_report": source.report if source is not None else None}


def _log_samples(decoder, held_out, cfg: TrainConfig, writer, step: int) -> None:
    pixels, feats = held_out
    h, w = pixels.shape[2] // TOKEN_PIXELS, pixels.shape[3] // TOKEN_PIXELS
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


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainConfig):
        if f.name == "decoder_overrides":
            continue
        kind = type(f.default) if f.default is not None else str
        if kind is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    p.add_argument("--tokenizer", default=None, help="SiglipVQTokenizer.from_pretrained folder (default: tiny random)")
    args = vars(p.parse_args(argv))
    tok_path = args.pop("tokenizer")
    cfg = TrainConfig(**args)
    from megatron_xomni.models.siglip_vq import SiglipVQTokenizer, tokenizer_config

    if tok_path:
        tok = SiglipVQTokenizer.from_pretrained(tok_path)
    else:
        torch.manual_seed(cfg.seed)
        tok = SiglipVQTokenizer(tokenizer_config("tiny"))
    tok.eval().requires_grad_(False)
    result = train(cfg, tok)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"step": result["step"], "final_loss": result["losses"][-1] if result["losses"] else None,
                          "export": str(result["export"])}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
