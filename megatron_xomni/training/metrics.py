"""One metrics logger for every trainer (console line with progress and ETA, TensorBoard scalars,
metrics.jsonl) and throughput accounting (tokens/s, TFLOP/s and MFU from model FLOPs,
models/xomni/flops.py)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import psutil
import torch



def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class MetricsLogger:
    """Writes on one rank only (the caller decides which). Every trainer logs through `log_step`, so
    every console line reads `[name] step N/T | ... | ETA hh:mm:ss` and every metrics.jsonl record
    holds `iteration` plus the scalars (names with '/' become '_')."""

    def __init__(self, tensorboard_dir: Optional[str], jsonl_path: Optional[str], enabled: bool,
                 name: str = "run", total_steps: int = 0, start_step: int = 0):
        self.enabled = enabled
        self.name, self.total_steps, self.start_step = name, total_steps, start_step
        self.t_start = time.perf_counter()
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

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0 or not self.total_steps:
            return "--:--:--"
        seconds = (time.perf_counter() - self.t_start) / done * max(self.total_steps - step, 0)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def log_step(self, step: int, scalars: dict, parts: list[str]) -> None:
        """The standard progress line for `step` plus its scalars."""
        line = " | ".join([f"[{self.name}] step {step:>6}/{self.total_steps}", *parts, f"ETA {self.eta(step)}"])
        self.log(step, scalars, line)

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
    """Tokens/s, TFLOP/s and MFU over a logging window. The caller adds each step's processed
    positions and model FLOPs (models/xomni/flops.py: the 6N + attention convention)."""

    def __init__(self, world_size: int, peak_tflops: float):
        self.world = world_size
        self.peak = peak_tflops
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def window(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        tflops = self.flops / dt / 1e12 / self.world
        return {
            "throughput/tokens_per_s": tps,
            "throughput/tokens_per_s_per_gpu": tps / self.world,
            "throughput/tflops_per_gpu": tflops,
            "throughput/mfu": tflops / self.peak,
            "throughput/window_seconds": dt,
        }


def open_run_outputs(cfg, start_step: int, rank0: bool) -> "MetricsLogger":
    """What every trainer writes under its save_dir, opened the same way: the folder, run_config.json
    (rank 0: the config a resume is checked against) and the metrics logger (metrics.jsonl and
    TensorBoard under save_dir/tensorboard). `cfg`: a RunSection."""
    if rank0:
        Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.save_dir) / "run_config.json").write_text(cfg.to_json())
    return MetricsLogger(str(Path(cfg.save_dir) / "tensorboard"), str(Path(cfg.save_dir) / "metrics.jsonl"),
                         rank0, name=cfg.name, total_steps=cfg.steps, start_step=start_step)
