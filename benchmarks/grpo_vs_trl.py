"""A GRPO step: this stack (rollouts in the training layout + `GRPOStep`) vs TRL's `GRPOTrainer`.

    pip install -e .[bench]          # TRL and what it needs (benchmark-only)
    OMP_NUM_THREADS=1 python benchmarks/grpo_vs_trl.py --threads 1

The same tiny random Qwen2 (saved once; TRL trains that model, ours is its conversion to the
Megatron X-Omni model with no vision blocks, loaded at TP=1) learns the same text task on both
sides, with the same settings:
  - prompts: `--prompts` word sequences of `--prompt-len` tokens from a word-level tokenizer
    (`w<k>` is token k), each sampled G = `--group` times at temperature 1 (no top-k/p, no min-p);
  - completions of exactly `--completion-len` tokens (ours: no eos; TRL: `min_new_tokens` equal
    to `max_completion_length`);
  - one reward function on the decoded completion text (the share of words with an even index);
  - group-normalised advantages (std-scaled), clipped ratio (eps 0.2), no KL (beta 0, TRL's
    default), per-sequence token means (TRL `loss_type="grpo"`, ours `loss_aggregation="sequence"`),
    one optimizer update per step over micro-batches of `--micro-batch` rows
    (TRL: gradient accumulation), AdamW lr 1e-5 (betas 0.9/0.999, no decay), grad-norm clip 1.0.

Our step is what `rl/trainer.py` runs for images, in text mode: `generate_text` on the policy's own
parameters (the lean decode path), decode + reward, `GRPOStep` (megatron-core schedule, DDP,
Megatron optimizer). TRL's step is one `GRPOTrainer` optimizer step (transformers `generate`,
reward, loss, backward, AdamW), timed from a callback; after each TRL step the callback runs one
of ours, so the two alternate in one process (load from other jobs hits both alike). The first
step of each is untimed. TRL runs with megatron_xomni's CPU TorchFunctionMode popped (its native
speed); ours with it pushed, as in training. A third row (`--no-mkl-row` drops it) runs our step with
the CPU GEMMs on MKL (models/xomni/cpu_linear.set_enabled(False), the kernel transformers and TRL use)
instead of oneDNN: the same-kernel comparison.

Prints per-step wall and CPU seconds (this process, `time.process_time`: leaves out the time the
scheduler gives to other processes), the generation/update split, samples/s and the ratio.
Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer: `<pad>` 0, `<eos>` 1, `w<k>` k for 2 <= k < vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{k}": k for k in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def even_word_reward(completions, **_):
    """Share of completion words whose index is even (the same function scores both sides)."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def _hf_model(path, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _ours(hf_dir, out, args):
    """(process groups, chunks, wrapped chunks, optimizer) of the converted policy at TP=1."""
    from megatron_xomni.checkpointing import load_checkpoint, read_metadata, resolve_checkpoint
    from megatron_xomni.conversion.convert import convert_hf_to_megatron
    from megatron_xomni.models.xomni import XOmniModelConfig
    from megatron_xomni.models.xomni.builder import build_model_chunks
    from megatron_xomni.parallel import ParallelConfig, initialize_parallel
    from megatron_xomni.training.optim import OptimConfig, wrap_and_build_optimizer
    from megatron_xomni.training.step import load_model_state, model_sharded_state_dict

    convert_hf_to_megatron(hf_dir, out, vision_layers=(0, 0), image_vocab_size=args.image_vocab,
                           image_table_size=args.image_vocab)
    path = resolve_checkpoint(out)
    mcfg = XOmniModelConfig.from_dict(read_metadata(path, "model_config"))
    pg = initialize_parallel(ParallelConfig())
    chunks = build_model_chunks(mcfg, ParallelConfig(), pg)
    load_model_state(chunks, load_checkpoint(path, model_sharded_state_dict(chunks)))
    optim = OptimConfig(lr=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                        clip_grad=1.0)
    wrapped, opt = wrap_and_build_optimizer(chunks, optim, pg)
    return pg, chunks, wrapped, opt


@contextlib.contextmanager
def _megatron_mode():
    """Re-push megatron_xomni's CPU TorchFunctionMode inside a block that runs with it popped."""
    from megatron_xomni import cpu_compat

    mode = cpu_compat._MODE
    if mode is None:
        yield
        return
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--image-vocab", type=int, default=64, help="image table of the converted model (unused by text)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each (after one untimed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-mkl-row", action="store_true", help="skip our step with MKL GEMMs (same kernel as TRL)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.prompts * args.group
    if rows % args.micro_batch:
        raise SystemExit(f"--prompts x --group = {rows} is not a multiple of --micro-batch={args.micro_batch}")

    from megatron_xomni.parallel import single_process_env

    single_process_env()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from megatron_xomni import cpu_compat
    from megatron_xomni.inference.generation import RolloutConfig, generate_text
    from megatron_xomni.inference.sampling import SamplingConfig
    from megatron_xomni.models.xomni import cpu_linear
    from megatron_xomni.parallel import destroy_parallel
    from megatron_xomni.rl.grpo import GRPOConfig, GRPOStep

    tmp = tempfile.mkdtemp(prefix="grpo_bench_")
    tok = word_tokenizer(args.vocab)
    hf = _hf_model(f"{tmp}/hf", args)
    pg, chunks, wrapped, opt = _ours(f"{tmp}/hf", f"{tmp}/mg", args)

    g = torch.Generator().manual_seed(0)
    n_prompts = args.prompts * (args.steps + 2)  # a fresh set of prompts every step
    prompt_ids = torch.randint(2, args.vocab, (n_prompts, args.prompt_len), generator=g).tolist()
    prompt_text = [" ".join(f"w{k}" for k in ids) for ids in prompt_ids]
    assert tok(prompt_text[0], add_special_tokens=False)["input_ids"] == prompt_ids[0]

    # The two policies start equal: same next-token log-probs on a prompt.
    with torch.no_grad(), cpu_compat.suspended():
        ref = torch.log_softmax(hf(torch.tensor(prompt_ids[:2])).logits.float(), -1)
    from megatron_xomni.training.step import forward_logits

    ids = torch.tensor(prompt_ids[:2])
    mb = {"tokens": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    ours_logits = forward_logits(chunks, [mb], pg)[0][..., : args.vocab]
    start_diff = (torch.log_softmax(ours_logits.float(), -1) - ref).abs().max().item()

    # ---- ours ---------------------------------------------------------------------------------
    gcfg = GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.2, kl_beta=0.0, loss_aggregation="sequence",
                      micro_batch_size=args.micro_batch, num_minibatches=1, ppo_epochs=1)
    grpo = GRPOStep(wrapped, opt, pg, gcfg)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    ours_times, mkl_times = [], []

    def our_step(step: int):
        t0, c0 = time.perf_counter(), time.process_time()
        part = prompt_ids[step * args.prompts : (step + 1) * args.prompts]
        rcfg = RolloutConfig(sampling=sampling, samples_per_prompt=args.group, seed=1000 + step,
                             max_rows_per_forward=rows)
        rollouts = generate_text(chunks, pg, part, args.completion_len, None, rcfg,
                                 prompt_ids=list(range(len(part))))
        t_gen = time.perf_counter() - t0
        texts = tok.batch_decode([r.tokens[r.prompt_length:].tolist() for r in rollouts], skip_special_tokens=True)
        rewards = even_word_reward(texts)
        stats = grpo(rollouts, rewards)
        assert stats["updates_ok"] and stats["num_updates"] == 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, t_gen, sum(rewards) / len(rewards)

    # ---- TRL ----------------------------------------------------------------------------------
    trl_cfg = TRLConfig(
        output_dir=f"{tmp}/trl", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=rows // args.micro_batch, num_generations=args.group,
        max_completion_length=args.completion_len, generation_kwargs={"min_new_tokens": args.completion_len},
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, beta=0.0, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        max_steps=args.steps + 1, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, shuffle_dataset=False, seed=0, log_completions=False,
    )
    trl_gen = []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                trl_gen.append(time.perf_counter() - t0)

    marks = {}
    trl_times = []

    class Alternate(TrainerCallback):
        """Time each TRL optimizer step; after it, run (and time) one of ours."""

        def on_step_begin(self, a, state, control, **kw):
            if "t" not in marks:  # first step: measured from its own begin
                marks["t"], marks["c"] = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            trl_times.append((time.perf_counter() - marks["t"], time.process_time() - marks["c"]))
            with _megatron_mode():
                ours_times.append(our_step(state.global_step - 1))
                if not args.no_mkl_row:
                    cpu_linear.set_enabled(False)
                    try:
                        mkl_times.append(our_step(state.global_step - 1))
                    finally:
                        cpu_linear.set_enabled(True)
            marks["t"], marks["c"] = time.perf_counter(), time.process_time()

    dataset = Dataset.from_dict({"prompt": prompt_text})
    trainer = TimedGRPOTrainer(model=hf, reward_funcs=even_word_reward, args=trl_cfg, train_dataset=dataset,
                               processing_class=tok, callbacks=[Alternate()])
    with cpu_compat.suspended():
        trainer.train()
    trl_rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]

    def med(xs):
        return statistics.median(xs[1:])  # the first step is the warm-up

    def split(times):
        return med([t[0] for t in times]), med([t[1] for t in times]), med([t[2] for t in times])

    t_wall, t_cpu = med([t[0] for t in trl_times]), med([t[1] for t in trl_times])
    t_gen = med(trl_gen)
    rows_out = [("megatron-xomni", *split(ours_times))]
    if mkl_times:
        rows_out.append(("megatron-xomni, MKL", *split(mkl_times)))
    rows_out.append(("TRL GRPOTrainer", t_wall, t_cpu, t_gen))
    print(f"config: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}; {args.prompts} prompts x G={args.group} = {rows} samples/step, prompt "
          f"{args.prompt_len}, completion {args.completion_len}, micro-batch {args.micro_batch}; "
          f"torch threads {torch.get_num_threads()}; {args.steps} timed steps after 1 untimed")
    print(f"start: max |log-prob difference| ours vs HF = {start_diff:.2e}")
    for name, wall, cpu, gen in rows_out:
        print(f"{name:>20}: {wall:6.2f} s/step wall ({cpu:6.2f} CPU s), generation {gen:5.2f} s, "
              f"rest {wall - gen:5.2f} s  ->  {rows / wall:6.1f} samples/s ({rows / cpu:6.1f} per CPU s)")
    for name, wall, cpu, gen in rows_out[:-1]:
        print(f"ratio ({name} / TRL samples/s): {t_wall / wall:.2f}x wall, {t_cpu / cpu:.2f}x CPU seconds; "
              f"generation {t_gen / gen:.2f}x, rest {(t_wall - t_gen) / (wall - gen):.2f}x")
    print(f"mean reward per step: ours {[round(t[3], 3) for t in ours_times]}, TRL {[round(r, 3) for r in trl_rewards]}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
