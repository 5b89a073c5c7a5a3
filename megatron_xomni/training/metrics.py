"""Throughput accounting and logging (console line, TensorBoard scalars, metrics.jsonl)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import psutil
import torch

from megatron_xomni.models.xomni.config import XOmniModelConfig


def flops_per_token(m: XOmniModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward).

    Forward per token: 2 x every matmul weight (QKV, out-proj, SwiGLU, one output head) plus
    causal attention scores and values, 2 x 2 x s/2 x hidden per layer. Vision blocks are counted
    like LM layers because every position is computed in them.
    """
    h, f, layers = m.hidden_size, m.ffn_hidden_size, m.num_layers_total
    kv = m.num_query_groups * m.kv_channels
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    head = h * m.text_vocab_size  # one head per position in practice (image or text)
    attention = 2 * layers * seq_length * h  # QK^T and AV, causal half of 2*s*h each
    return 3 * (2 * (layers * per_layer + head) + attention)


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class MetricsLogger:
    """Writes on one rank only (the caller decides which)."""

    def __init__(self, tensorboard_dir: Optional[str], jsonl_path: Optional[str], enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl_path, "a")

    def log(self, iteration: int, scalars: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.writer.add_scalar(k, v, iteration)
            self.writer.flush()
        if self.jsonl is not None:
            clean = {k.replace("/", "_"): v for k, v in scalars.items()}
            self.jsonl.write(json.dumps({"iteration": iteration, **clean}) + "\n")
            self.jsonl.flush()
        if line:
            print(line, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Throughput:
    """Tokens/s, TFLOP/s and MFU over a logging window."""

    def __init__(self, model_cfg: XOmniModelConfig, seq_length: int, world_size: int, peak_tflops: float):
        self.fpt = flops_per_token(model_cfg, seq_length)
        self.world = world_size
        self.peak = peak_tflops
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def window(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = tps * self.fpt / 1e12 / self.world
        return {
            "throughput/tokens_per_s": tps,
            "throughput/tokens_per_s_per_gpu": tps / self.world,
            "throughput/tflops_per_gpu": tflops,
            "throughput/mfu": tflops / self.peak,
            "_seconds": dt,
        }
