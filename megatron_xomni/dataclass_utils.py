"""Typed config dataclasses: built from saved dicts, changed by `key=value` overrides, range-checked.

Every stage's run config goes through these, so every stage speaks the same override language."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """`cls(**data)`, refusing keys the dataclass does not have (a file from another version)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}: the config was written by another "
                         "version; remove them")
    return cls(**data)


def _parse_value(text: str, current: Any, annotation) -> Any:
    if text.lower() in ("none", "null"):
        return None
    kind = type(current) if current is not None else None
    if kind is None:
        args = [a for a in typing.get_args(annotation) if a is not type(None)] if annotation else []
        kind = args[0] if args and isinstance(args[0], type) else None
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if kind in (int, float, str):
        return kind(float(text)) if kind is int and ("e" in text.lower() or "." in text) else kind(text)
    if kind in (list, dict):
        return json.loads(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Knobs that were renamed when every stage got one run section: an old name is a one-line error naming
# the new one (only when the config has no field of the old name). A stage config adds its own old
# names in a `RENAMED_FIELDS` class variable (e.g. the SigLIP-VQ trainer's `llm_checkpoint`).
RENAMED = {
    "train_iters": "steps", "iters": "steps", "num_steps": "steps",
    "save_every": "save_interval", "ckpt_every": "save_interval", "checkpoint_interval": "save_interval",
    "log_every": "log_interval", "out": "save_dir", "out_dir": "save_dir", "output_dir": "save_dir",
    "keep_checkpoints": "keep_last", "grad_clip": "optim.clip_grad", "lr": "optim.lr",
    "warmup_iters": "schedule.warmup_steps", "lr_warmup_steps": "schedule.warmup_steps",
    "decay_iters": "schedule.decay_steps", "wsd_decay_iters": "schedule.wsd_decay_steps",
    "prompt_seed": "prompts.seed", "prompt_skills": "prompts.skills",
    "prompt_file": "prompts.source", "prompts_file": "prompts.source",
    "warmup_steps": "schedule.warmup_steps", "weight_decay": "optim.weight_decay", "ckpt_dir": "save_dir",
}
# Knobs that are gone: the message says what replaced them.
REMOVED = {
    "resume": "a run continues from its save_dir by itself; delete the save_dir (or pick a new one) to start over",
    "no_resume": "a run continues from its save_dir by itself; pick a new save_dir to start over",
}


def _old_flag(item: str, renamed: dict) -> str:
    """The error for `--steps 100`-style arguments of the retired argparse tools."""
    flag = item.split("=", 1)[0]
    name = flag.lstrip("-").replace("-", "_")
    if name in REMOVED:
        return f"`{flag}` is gone: {REMOVED[name]}"
    return f"`{flag}` is a flag of the old command line: overrides are key=value, write {renamed.get(name, name)}=VALUE"


def apply_overrides(cfg, overrides: list[str]):
    """Apply `a.b=value` strings to a dataclass tree in place; unknown keys are errors."""
    renamed = {**RENAMED, **getattr(type(cfg), "RENAMED_FIELDS", {})}
    for item in overrides:
        if item.startswith("-"):
            raise ValueError(_old_flag(item, renamed))
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-5)")
        key, text = item.split("=", 1)
        obj, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ValueError(f"unknown config section {p!r} in override {item!r}")
            obj = getattr(obj, p)
        name = parts[-1]
        if not dataclasses.is_dataclass(obj):
            raise ValueError(f"{'.'.join(parts[:-1])} is a value, not a section: drop the .{name}")
        fields_ = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields_:
            old = key if key in renamed else name
            if old in renamed and (old == key or len(parts) == 1 or renamed[old].startswith(parts[-2] + ".")):
                raise ValueError(f"`{old}` is now `{renamed[old]}`: write {renamed[old]}={text}")
            if key in REMOVED:
                raise ValueError(f"`{key}` is gone: {REMOVED[key]}")
            close = ", ".join(sorted(fields_)[:12])
            raise ValueError(f"unknown config key {key!r}: {type(obj).__name__} has {close}, ...")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            sub = ", ".join(f.name for f in dataclasses.fields(current))[:80]
            raise ValueError(f"{key} is a section, not a value: set its fields instead, e.g. {key}.<field> ({sub})")
        hints = typing.get_type_hints(type(obj))
        try:
            value = _parse_value(text, current, hints.get(name))
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
        setattr(obj, name, value)
    return cfg


def check_numbers(values: dict[str, Any], minimum: float, optional: bool = False, integer: bool = True) -> None:
    """One-line ValueError for the first value (by dotted name) that is None (unless `optional`), of the
    wrong type, or below `minimum`."""
    for name, v in values.items():
        if v is None:
            if optional:
                continue
            raise ValueError(f"{name}=None: give {'an integer' if integer else 'a number'} >= {minimum:g}")
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise ValueError(f"{name}={v!r} is not {'an integer' if integer else 'a number'}: give one >= {minimum:g}")
        if v < minimum:
            raise ValueError(f"{name}={v!r} must be >= {minimum:g}")
