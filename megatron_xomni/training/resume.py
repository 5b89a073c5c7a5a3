"""The rule for resuming a run whose command line changed.

Checked before any process group starts, from the checkpoint's saved `run_config.json`:

- The *data plan* decides which sample every step reads: the blend, sequence length, split,
  packing, special ids, the seed of the sample order and the global batch. A change is refused with
  one line naming the field; `data.allow_plan_change=true` accepts it knowingly (the run then
  continues at its consumed-sample count in the new plan). `steps` is not part of the plan: the
  sample stream does not depend on the run length, so a longer run continues the same order.
- *Schedule and optimizer values* (learning rates, warmup and decay, weight decay, Adam's betas and
  epsilon, clipping, the number of steps) are applied on purpose: the command line wins over the
  checkpoint, and one line says which changed, from what to what.
- The *optimizer state's shape* (distributed optimizer or not, which parameters train, precision)
  cannot change: the saved state would not fit. Refused with one line; start a new run from the
  checkpoint's weights with `init_from` instead.
- Anything else that differs (logging, intervals, paths, the parallel layout) simply takes the new
  value; a checkpoint loads at any TP/PP/DP layout.
"""

from __future__ import annotations

from typing import Optional

# dotted config paths
DATA_PLAN_FIELDS = ("data.blend", "data.seq_length", "data.split", "data.pack_documents", "data.eod_id",
                    "data.pad_id", "data.global_batch_size", "seed")
APPLIED_FIELDS = ("optim.lr", "optim.min_lr", "optim.weight_decay", "optim.adam_beta1", "optim.adam_beta2",
                  "optim.adam_eps", "optim.clip_grad", "schedule.style", "schedule.warmup_steps",
                  "schedule.decay_steps", "schedule.wsd_decay_steps", "schedule.wsd_decay_style", "steps")
STATE_SHAPE_FIELDS = ("optim.use_distributed_optimizer", "trainable", "precision")
_MISSING = object()


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def diff(saved: dict, current: dict, fields) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field that differs; fields unknown to the
    checkpoint (older config versions) are skipped."""
    out = []
    for f in fields:
        a, b = _get(saved, f), _get(current, f)
        if a is _MISSING or b is _MISSING:
            continue
        if not _same(a, b):
            out.append((f, a, b))
    return out


class ResumeRefused(ValueError):
    """A resumed run's data plan differs from its checkpoint's."""


def check_resume(saved: Optional[dict], current: dict, allow_plan_change: bool, where: str) -> tuple[list, list]:
    """(plan changes accepted, applied setting changes) or ResumeRefused naming the first plan change."""
    if saved is None:
        return [], []
    fixed = diff(saved, current, STATE_SHAPE_FIELDS)
    if fixed:
        field, a, b = fixed[0]
        raise ResumeRefused(
            f"resuming {where}: {field} changed from {a!r} to {b!r}, so the saved optimizer state does not fit: "
            f"resume with {field}={a}, or start a new save_dir with init_from=<this checkpoint root>")
    plan = diff(saved, current, DATA_PLAN_FIELDS)
    if plan and not allow_plan_change:
        field, a, b = plan[0]
        raise ResumeRefused(
            f"resuming {where}: {field} changed from {a!r} to {b!r}, which changes the samples every step reads: "
            "use a new save_dir, or set data.allow_plan_change=true to accept it knowingly")
    return plan, diff(saved, current, APPLIED_FIELDS)


def describe(changes: list) -> str:
    return "; ".join(f"{f} {a!r} -> {b!r}" for f, a, b in changes)
