"""`xomni scaling collect`: one table (CSV) of a sweep's runs, read from each run's own files.

Per run (its save_dir): metrics.jsonl, run_config.json, latest_checkpointed_iteration.txt and the
launcher's scaling_attempts.jsonl. Columns:
- status: finished | partial | new (only finished runs are fitted);
- params = N, the *non-embedding* parameter count (all but the input embedding tables; the output
  heads count), params_total, params_embedding; tokens = D = steps x global batch x sequence length;
- flops = C, the model FLOPs the trainer counted (6N-style + attention, models/xomni/flops.py): its
  logged FLOPs per position (throughput_tflops_per_gpu / throughput_tokens_per_s_per_gpu, averaged
  over the logging windows weighted by their positions) times D; flops_planned is the plan's value;
- text_loss, image_loss, loss: validation losses at the final step (split by the modality of the
  target); *_smoothed: the same losses smoothed over the last `tail` of training: the value at the
  final step of a least-squares line through the evaluations in that tail (at least 3 of them,
  else the final value), which averages out the evaluation noise without the upward bias of a mean
  of earlier (higher) losses; valid_iteration and evals say what was there;
- train_seconds: the logged training windows (validation included, start-up excluded), over all
  attempts; wall_seconds: the launcher's attempts (start-up included); attempts;
- the run config: recipe, resolved sizes, steps, batch, sequence length, learning rates, warmup,
  seed, layout, and the overrides (JSON).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_xomni.scaling.launch import ATTEMPTS_FILE, check_saved_configs, run_state
from megatron_xomni.scaling.report import atomic_write

LOSSES = ("text_loss", "image_loss", "loss")
COLUMNS = (
    "name", "status", "design", "budget", "depth", "params", "params_total", "params_embedding",
    "tokens", "flops", "flops_planned", "tokens_per_param",
    "text_loss", "image_loss", "loss", "text_loss_smoothed", "image_loss_smoothed", "loss_smoothed",
    "valid_iteration", "evals", "valid_tokens", "train_text_loss", "train_image_loss",
    "train_seconds", "wall_seconds", "attempts",
    "recipe", "seed", "steps", "global_batch_size", "micro_batch_size", "seq_length", "lr", "min_lr",
    "warmup_steps", "schedule", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
    "ffn_hidden_size", "vision_blocks", "tensor_parallel", "pipeline_parallel", "world_size",
    "save_dir", "overrides",
)


def read_metrics(path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a metrics.jsonl, each sorted by iteration. A resumed
    run logs the steps after its checkpoint again: the last record per iteration wins."""
    train, valid = {}, {}
    p = Path(path)
    if not p.exists():
        return [], []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if not isinstance(rec, dict) or "iteration" not in rec:
            continue
        (valid if "valid_loss" in rec else train)[rec["iteration"]] = rec
    return [train[k] for k in sorted(train)], [valid[k] for k in sorted(valid)]


def smoothed(valid: list[dict], key: str, steps: int, tail: float = 0.5) -> float:
    """`key` at the final step from a line through the evaluations in the last `tail` of training
    (>= 3 finite ones), else the final evaluation's value."""
    pts = [(r["iteration"], r.get(key)) for r in valid if r["iteration"] >= (1.0 - tail) * steps]
    pts = [(i, v) for i, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
    if not pts:
        return math.nan
    if len(pts) < 3:
        return float(pts[-1][1])
    x, y = np.array(pts, dtype=float).T
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept + slope * steps)


def flops_per_position(train: list[dict]) -> float:
    """Model FLOPs per trained position from the throughput records (position-weighted)."""
    num = den = 0.0
    for r in train:
        tps, per_gpu = r.get("throughput_tokens_per_s"), r.get("throughput_tokens_per_s_per_gpu")
        tflops, dt = r.get("throughput_tflops_per_gpu"), r.get("throughput_window_seconds")
        if not all(isinstance(v, (int, float)) and v > 0 for v in (tps, per_gpu, tflops, dt)):
            continue
        positions = tps * dt
        num += positions * tflops * 1e12 / per_gpu
        den += positions
    return num / den if den else math.nan


def _attempts(save_dir: Path) -> list[dict]:
    p = save_dir / ATTEMPTS_FILE
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _config(run: dict) -> dict:
    path = Path(run["save_dir"]) / "run_config.json"
    if path.exists():
        return json.loads(path.read_text())
    from megatron_xomni.recipes import load_recipe

    return load_recipe(run["recipe"], run["overrides"]).to_dict()


def _final(valid: list[dict], steps: int) -> Optional[dict]:
    return valid[-1] if valid and valid[-1]["iteration"] == steps else None


def collect_run(run: dict, sweep: dict, tail: float = 0.5) -> dict:
    from megatron_xomni.models.xomni.config import XOmniModelConfig
    from megatron_xomni.models.xomni.flops import param_counts

    save_dir = Path(run["save_dir"])
    cfg = _config(run)
    m, data, optim = cfg["model"], cfg["data"], cfg["optim"]
    p = param_counts(XOmniModelConfig(**m))
    steps = cfg["steps"]
    tokens = steps * data["global_batch_size"] * data["seq_length"]
    train, valid = read_metrics(save_dir / "metrics.jsonl")
    status = run_state(run)
    final = _final(valid, steps) if status == "finished" else None
    fpp = flops_per_position(train) if status == "finished" else math.nan
    attempts = _attempts(save_dir)
    nan = math.nan
    row = {
        "name": run["name"], "status": status, "design": sweep["design"],
        "budget": run["budget"] if run["budget"] is not None else "", "depth": run["depth"],
        "params": p.non_embedding, "params_total": p.total, "params_embedding": p.embedding,
        "tokens": tokens, "flops": fpp * tokens if math.isfinite(fpp) else "",
        "flops_planned": run["flops"], "tokens_per_param": tokens / p.non_embedding,
        "valid_iteration": valid[-1]["iteration"] if valid else "", "evals": len(valid),
        "valid_tokens": final.get("valid_tokens", "") if final else "",
        "train_text_loss": train[-1].get("train_text_loss", "") if train else "",
        "train_image_loss": train[-1].get("train_image_loss", "") if train else "",
        "train_seconds": sum(r.get("throughput_window_seconds", 0.0) for r in train),
        "wall_seconds": sum(a.get("seconds", 0.0) for a in attempts) if attempts else "",
        "attempts": len(attempts),
        "recipe": run["recipe"], "seed": cfg["seed"], "steps": steps,
        "global_batch_size": data["global_batch_size"], "micro_batch_size": data["micro_batch_size"],
        "seq_length": data["seq_length"], "lr": optim["lr"], "min_lr": optim["min_lr"],
        "warmup_steps": cfg["schedule"]["warmup_steps"], "schedule": cfg["schedule"]["style"],
        "hidden_size": m["hidden_size"], "num_layers": m["num_layers"],
        "num_attention_heads": m["num_attention_heads"], "num_query_groups": m["num_query_groups"],
        "ffn_hidden_size": m["ffn_hidden_size"], "vision_blocks": m["num_vision_adapter_layers"],
        "tensor_parallel": cfg["parallel"]["tensor_parallel"],
        "pipeline_parallel": cfg["parallel"]["pipeline_parallel"], "world_size": sweep["world_size"],
        "save_dir": run["save_dir"], "overrides": json.dumps(run["overrides"]),
    }
    for key in LOSSES:
        v = final.get(f"valid_{key}", nan) if final else nan
        s = smoothed(valid, f"valid_{key}", steps, tail) if final else nan
        row[key] = v if isinstance(v, (int, float)) and math.isfinite(v) else ""
        row[f"{key}_smoothed"] = s if math.isfinite(s) else ""
    return row


def collect(sweep: dict, tail: float = 0.5) -> list[dict]:
    """One row per run of the sweep, in the sweep's order."""
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"smoothing tail {tail} must be in (0, 1]: the share of training at the end")
    check_saved_configs(sweep["runs"])
    return [collect_run(r, sweep, tail) for r in sweep["runs"]]


def write_table(rows: list[dict], path) -> Path:
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write)
    return path


def read_table(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no run table at {p}: write one with xomni scaling collect")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"name", "status", "params", "tokens", "flops"} - set(rows[0] if rows else COLUMNS)
    if not rows or missing:
        raise ValueError(f"{p} is not a run table of xomni scaling collect (missing {sorted(missing) or 'rows'})")
    return rows
