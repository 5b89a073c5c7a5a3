"""`xomni scaling plan`: a grid of training runs written as one sweep file (JSON).

Two designs:
- *iso-FLOP* (`budgets`): every compute budget C x every family depth. A run's steps are
  C / (global batch x sequence length x model FLOPs per token), rounded to the nearest step or
  moved by at most `step_tolerance` (2 %) to a count that spaces the evaluations evenly; the batch
  comes from the family's rule for C.
- *sizes x tokens* (`tokens`): every depth x every token count D; steps = D / (batch x length),
  the batch from the family's rule for the run's compute C = FLOPs per token x D.

Each cell is the recipe with overrides, nothing else: the model's size fields from the family
member (`scaling/family.py`), `steps`, `data.global_batch_size`, `optim.lr` (and `optim.min_lr` at
the recipe's min/peak ratio) from the family's rules, a warmup fraction, a `save_dir` per run and an
evaluation schedule whose last evaluation is the final step (validation text and image loss are
what `collect` reads). The user's overrides (data, layout, ...) apply to every run; the keys the
plan derives cannot be overridden. Every run is loaded and validated for the world size (types,
layout, batch divisibility) before anything is written; local paths are checked when runs start.

Model FLOPs per token are `models/xomni/flops.model_flops_per_token` at the expected share of image
targets, measured from the blend's token files when they exist (else 0.5, recorded as a guess).
N is the non-embedding parameter count (`flops.param_counts(...).non_embedding`: everything but
the input tables; the output heads are matmuls and count).

Refused in one line (PlanError, exit code 2): a depth that fails layout validation, a budget (or
token count) smaller than one step, too few points for a fit (approach 2 needs >= 3 sizes per
budget and >= 2 budgets; approach 3 needs >= 6 runs over >= 2 sizes and >= 2 token counts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_xomni.dataclass_utils import apply_overrides
from megatron_xomni.models.xomni.flops import model_flops_per_token, param_counts
from megatron_xomni.parallel.layout import LayoutError
from megatron_xomni.scaling.family import SIZE_FIELDS, ModelFamily, family_for

SWEEP_FORMAT = "xomni-scaling-sweep/1"
SWEEP_FILE = "sweep.json"
# Override keys the plan derives per run; a user override of one would silently break the design.
PLANNED_KEYS = {f"model.{k}" for k in SIZE_FIELDS} | {
    "steps", "data.global_batch_size", "optim.lr", "optim.min_lr", "schedule.warmup_steps",
    "schedule.decay_steps", "save_dir", "name", "eval_interval"}
IMAGE_FRACTION_GUESS = 0.5
_SAMPLE_TOKENS = 20_000_000  # image share estimated from at most this many tokens per blend file


class PlanError(ValueError):
    """A plan that cannot be run or fitted (one line, exit code 2)."""


@dataclass
class PlanRequest:
    recipe: str
    """Base recipe of every run (an AR recipe, e.g. tiny_pt)."""
    out: str
    """Sweep folder: <out>/sweep.json, runs in <out>/runs/<run>."""
    depths: list
    """Family depths (the size dial)."""
    budgets: Optional[list] = None
    """Iso-FLOP design: training FLOPs per run."""
    tokens: Optional[list] = None
    """Sizes x tokens design: training tokens per run."""
    overrides: list = field(default_factory=list)
    """key=value overrides of the recipe for every run (data.blend=..., parallel.*, seed, ...)."""
    family: list = field(default_factory=list)
    """key=value overrides of the ModelFamily rules (aspect_ratio=32, lr_ref=1e-3, ...)."""
    world_size: int = 1
    """Ranks each run will have (layout validation, data-parallel size of the batch rounding)."""
    image_fraction: Optional[float] = None
    """Share of training targets that are image tokens (None: measured from the blend)."""
    evals: int = 4
    """Validation evaluations per run, about evenly spaced; the last one is the final step."""
    eval_iters: int = 4
    """Validation global batches per evaluation."""
    warmup_fraction: float = 0.05
    """schedule.warmup_steps = round(fraction x steps)."""
    step_tolerance: float = 0.02
    """A run's steps may differ from its budget's by this fraction so that `evals` evaluations
    can be evenly spaced (see `choose_steps`); its FLOPs in the sweep are the exact ones."""
    name: Optional[str] = None
    """Sweep name (run names, the SLURM job name); default: the folder's name."""


def parse_numbers(text: str, what: str, integer: bool = False) -> list:
    """'1e12,2e12,4e12' or 'START:STOP:COUNT' (COUNT log-spaced values, both ends included)."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            values = list(np.geomspace(float(start), float(stop), int(count)))
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PlanError(f"{what} {text!r}: give comma-separated numbers (1e12,2e12) or START:STOP:COUNT") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise PlanError(f"{what} {text!r}: every value must be a positive number")
    if integer:
        if any(v != int(v) for v in values):
            raise PlanError(f"{what} {text!r}: depths are whole numbers of layers")
        values = [int(v) for v in values]
    if len(set(values)) != len(values):
        raise PlanError(f"{what} {text!r} repeats a value: list each once")
    return sorted(values)


def eval_interval(steps: int, evals: int) -> int:
    """A divisor of `steps` (so the final step is evaluated) giving about `evals` evaluations."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(steps / d - evals), -d))


def choose_steps(exact: float, evals: int, tolerance: float) -> int:
    """The step count for a run that needs `exact` steps: the nearest integer, or, within
    `tolerance` x exact of it, the nearest one whose divisors space `evals` evaluations evenly
    (a prime step count allows only one evaluation, the final one)."""
    nearest = max(1, round(exact))
    lo, hi = max(1, math.ceil(exact * (1 - tolerance))), max(1, math.floor(exact * (1 + tolerance)))
    candidates = sorted({nearest, *range(lo, hi + 1)}, key=lambda s: abs(s - exact))
    return min(candidates, key=lambda s: abs(s / eval_interval(s, evals) - evals))


def _short(x: float) -> str:
    """1e12 -> '1e12', 2.5e12 -> '2.5e12' (for run names)."""
    return f"{x:.3g}".replace("e+", "e").replace("e0", "e")


def image_fraction_of_blend(blend: list, text_vocab_size: int) -> Optional[float]:
    """Share of supervised targets that are image ids (>= text_vocab_size) in what the blend feeds
    the trainer (whose FLOP count uses this share of targets); None when a file is missing. A blend
    weight is a share of *positions*, so file i contributes weight_i x (its targets per position)
    targets; an unweighted blend samples in proportion to the files' sizes. Reads the raw files
    (int32 ids, uint8 loss mask), at most 20M tokens each."""
    from megatron_xomni.data.token_dataset import _blend
    from megatron_xomni.data.token_files import token_file_paths

    prefixes, weights = _blend(blend)
    shares, targets = [], []
    for i, prefix in enumerate(prefixes):
        paths = token_file_paths(prefix)
        if not (paths["tokens_bin"].is_file() and paths["mask_bin"].is_file()):
            return None
        size = paths["mask_bin"].stat().st_size
        n = min(size, _SAMPLE_TOKENS)
        ids = np.memmap(paths["tokens_bin"], dtype=np.int32, mode="r")[:n]
        mask = np.memmap(paths["mask_bin"], dtype=np.uint8, mode="r")[:n].astype(bool)
        supervised = int(mask.sum())
        shares.append(float((ids[mask] >= text_vocab_size).sum()) / max(supervised, 1))
        targets.append(weights[i] * supervised / max(n, 1) if weights else supervised / max(n, 1) * size)
    w = np.asarray(targets, dtype=float)
    return float(np.dot(w, shares) / w.sum()) if w.sum() > 0 else None


def _load(recipe: str, overrides: list):
    from megatron_xomni.recipes import load_recipe

    try:
        return load_recipe(recipe, list(overrides))
    except (ValueError, TypeError, KeyError) as e:
        raise PlanError(f"recipe {recipe!r}: {' '.join(str(e).split())}") from None


def _check_design(req: PlanRequest) -> tuple[str, list]:
    if (req.budgets is None) == (req.tokens is None):
        raise PlanError("give either budgets (iso-FLOP design) or tokens (sizes x tokens design), not both")
    depths = list(req.depths)
    if req.budgets is not None:
        if len(depths) < 3:
            raise PlanError(f"{len(depths)} depth(s) per budget: approach 2 fits a parabola per budget and "
                            "needs >= 3 sizes per budget: give at least 3 depths")
        if len(req.budgets) < 2:
            raise PlanError(f"{len(req.budgets)} budget: approach 2 fits N_opt(C) over budgets and needs >= 2: "
                            "give at least 2 budgets")
        return "isoflop", list(req.budgets)
    if len(depths) < 2 or len(req.tokens) < 2 or len(depths) * len(req.tokens) < 6:
        raise PlanError(f"{len(depths)} depth(s) x {len(req.tokens)} token count(s): approach 3 fits 5 "
                        "parameters and needs >= 2 sizes, >= 2 token counts and >= 6 runs: add depths or tokens")
    return "tokens", list(req.tokens)


def _check_user_overrides(overrides: list) -> None:
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o:
            raise PlanError(f"override {o!r} is not key=value")
        if key in PLANNED_KEYS:
            raise PlanError(f"override {key} is set by the plan for every run (from the family, the budget "
                            "and the run's place in the sweep): drop it, or change the family rules (--family)")


def plan(req: PlanRequest) -> dict:
    """The sweep (a JSON-ready dict) for `req`; PlanError for a plan that cannot run or be fitted."""
    design, grid = _check_design(req)
    _check_user_overrides(req.overrides)
    if req.world_size < 1 or req.evals < 1 or req.eval_iters < 1:
        raise PlanError("world size, evals and eval iterations must be >= 1")
    if not 0.0 <= req.warmup_fraction < 1.0:
        raise PlanError(f"warmup fraction {req.warmup_fraction} must be in [0, 1)")
    if not 0.0 <= req.step_tolerance < 0.5:
        raise PlanError(f"step tolerance {req.step_tolerance} must be in [0, 0.5)")
    base = _load(req.recipe, req.overrides)
    if not hasattr(base, "model") or not hasattr(base, "data"):
        raise PlanError(f"recipe {req.recipe!r} is not an AR training recipe (no model/data sections): "
                        "use one like tiny_pt")
    try:
        family = apply_overrides(family_for(base.model), list(req.family))
    except (ValueError, TypeError) as e:
        raise PlanError(f"--family: {' '.join(str(e).split())}") from None
    par, seq = base.parallel, base.data.seq_length
    try:
        dp = par.data_parallel(req.world_size)
    except (ValueError, ZeroDivisionError) as e:
        raise PlanError(f"layout for world size {req.world_size}: {e}") from None
    multiple = base.data.micro_batch_size * dp

    fraction, source = req.image_fraction, "given"
    if fraction is None:
        fraction = image_fraction_of_blend(base.data.blend, base.model.text_vocab_size) if base.data.blend else None
        source = "measured from data.blend"
        if fraction is None:
            fraction, source = IMAGE_FRACTION_GUESS, "guess (data.blend not readable when planning)"
    if not 0.0 <= fraction <= 1.0:
        raise PlanError(f"image fraction {fraction} must be in [0, 1]")

    name = req.name or Path(req.out).resolve().name
    members = {}
    for d in req.depths:
        try:
            members[d] = family.validate_member(d, par.tensor_parallel, par.pipeline_parallel,
                                                par.virtual_pipeline_parallel, seq_length=seq)
        except LayoutError as e:
            raise PlanError(f"{e}: drop depth {d} or change the family/layout") from None
    min_lr_ratio = base.optim.min_lr / base.optim.lr if base.optim.lr else 0.0
    runs = []
    for value in grid:
        for d in req.depths:
            m = members[d]
            fpt = model_flops_per_token(m, seq, fraction)
            run = f"d{d}_{'C' if design == 'isoflop' else 'D'}{_short(value)}"
            if design == "isoflop":
                gbs = family.global_batch_size(value, seq, multiple)
                step_flops = gbs * seq * fpt
                if value < step_flops:
                    raise PlanError(f"budget {value:.3g} FLOPs is smaller than one step of depth {d} "
                                    f"({step_flops:.3g} FLOPs: {gbs} sequences x {seq} tokens): raise the "
                                    f"budget or drop depth {d}")
                steps = choose_steps(value / step_flops, req.evals, req.step_tolerance)
            else:
                gbs = family.global_batch_size(fpt * value, seq, multiple)
                if value < gbs * seq:
                    raise PlanError(f"token count {value:.3g} is smaller than one step of depth {d} "
                                    f"({gbs} sequences x {seq} tokens): raise it")
                steps = choose_steps(value / (gbs * seq), req.evals, req.step_tolerance)
            lr = family.learning_rate(d)
            save_dir = str(Path(req.out) / "runs" / run)
            overrides = [f"model.{k}={getattr(m, k)}" for k in SIZE_FIELDS] + [
                f"name={name}_{run}", f"save_dir={save_dir}", f"steps={steps}",
                f"data.global_batch_size={gbs}", f"optim.lr={lr:.6g}", f"optim.min_lr={lr * min_lr_ratio:.6g}",
                f"schedule.warmup_steps={min(round(req.warmup_fraction * steps), steps - 1)}",
                f"eval_interval={eval_interval(steps, req.evals)}", f"eval_iters={req.eval_iters}",
                f"save_interval={min(base.save_interval, steps)}", f"log_interval={min(base.log_interval, steps)}",
                "keep_last=1",  # only the final checkpoint matters to a sweep; the user may keep more
            ]
            if base.schedule.decay_steps is not None:
                overrides.append(f"schedule.decay_steps={steps}")  # one decay over the whole run
            overrides += list(req.overrides)
            cfg = _load(req.recipe, overrides)
            try:
                cfg.validate(req.world_size)
            except ValueError as e:
                raise PlanError(f"run {run}: {' '.join(str(e).split())}") from None
            tokens = steps * gbs * seq
            p = param_counts(m)
            runs.append({
                "index": len(runs), "name": run, "recipe": req.recipe, "overrides": overrides,
                "save_dir": save_dir, "depth": d, "budget": value if design == "isoflop" else None,
                "params": p.non_embedding, "params_total": p.total, "hidden_size": m.hidden_size,
                "steps": steps, "global_batch_size": gbs, "seq_length": seq, "tokens": tokens,
                "flops_per_token": fpt, "flops": tokens * fpt, "lr": lr,
            })
    if len({r["name"] for r in runs}) != len(runs):
        raise PlanError("two grid values give the same run name (they agree to 3 digits): space them further apart")
    return {
        "format": SWEEP_FORMAT, "name": name, "design": design, "recipe": req.recipe,
        "overrides": list(req.overrides), "family": dataclasses.asdict(family),
        "world_size": req.world_size, "image_fraction": fraction, "image_fraction_source": source,
        "params_count": "non-embedding (all but the input embedding tables; the output heads count)",
        "cwd": os.getcwd(), "runs": runs,
    }


def write_sweep(sweep: dict, path) -> Path:
    from megatron_xomni.scaling.report import atomic_write

    path = Path(path)
    atomic_write(path, lambda p: p.write_text(json.dumps(sweep, indent=1) + "\n"))
    return path


def sweep_path(path) -> Path:
    """A sweep file, or the folder holding sweep.json."""
    p = Path(path)
    return p / SWEEP_FILE if p.is_dir() else p


def read_sweep(path) -> dict:
    """The sweep file at `path` (or `path`/sweep.json), checked; relative run paths must resolve
    from the current directory, so launching elsewhere is refused (PlanError)."""
    p = sweep_path(path)
    if not p.is_file():
        raise PlanError(f"no sweep file at {p}: write one with xomni scaling plan")
    try:
        sweep = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"{p} is not a sweep file (bad JSON: {e})") from None
    if not isinstance(sweep, dict) or sweep.get("format") != SWEEP_FORMAT or not isinstance(sweep.get("runs"), list):
        raise PlanError(f"{p} is not a {SWEEP_FORMAT} file: write one with xomni scaling plan")
    relative = [r["save_dir"] for r in sweep["runs"] if not Path(r["save_dir"]).is_absolute()]
    if relative and Path(sweep.get("cwd", ".")).resolve() != Path.cwd().resolve():
        raise PlanError(f"the run folders in {p} are relative to {sweep['cwd']} (where it was planned): "
                        f"run this from there, or plan with an absolute --out")
    return sweep
