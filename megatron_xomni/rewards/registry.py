"""Reward plugins: a name -> factory registry and the weighted ensemble GRPO scores images with.

A reward is any callable ``fn(prompts, images, metas) -> list[float | None]`` scoring a batch:
one value per image, ``None`` where the reward does not apply to that image (the world detector
on a free-text prompt, OCR on a prompt that asks for no text).

``register_reward(name)`` registers a *factory*: a class or function called as
``factory(**kwargs)`` that returns such a callable. Factories let a reward hold state that must
be built once (an OCR engine, a model loaded from a local directory) and take per-run settings.

``RewardEnsemble`` combines several rewards into the scalar GRPO optimises. Its two policies:

* **Not applicable (``None``)**: the component is left out of that image's sum and the weights
  of the components that do apply are scaled up so they add up to the full weight total:
  ``total = sum_{c in A} w_c r_c * (sum_all w / sum_{c in A} w)``, with ``A`` the components
  that produced a value. With every component applicable this is the plain weighted sum
  ``sum_c w_c r_c``. The rescaling keeps totals of text prompts (where OCR applies) and
  non-text prompts (where it does not) on the same scale, which matters because GRPO
  normalises advantages within a group of samples of one prompt but the reward's scale still
  feeds logging and KL trade-off.
* **Failure** (the component raised, returned the wrong number of values or a non-finite
  number): the image's component is marked failed, counted and logged, and never crashes the
  step. ``on_failure="exclude"`` (default) treats it like ``None`` - an infrastructure hiccup
  says nothing about the image, so it should not push the image's advantage down.
  ``on_failure="zero"`` scores it 0 instead (pessimistic: an image the judge choked on counts
  as bad). When a batch call raises, the component is retried image by image so only the
  images that really fail are marked.

An image with no value from any component gets ``total = None``; the trainer should drop it.

**Row fields.** A reward declares the prompt-row fields it reads as ``required_fields`` on its
factory: a tuple of keys, or a function of the factory's kwargs returning one (for a reward whose
field name is configurable). The metas the ensemble scores are prompt rows
(``megatron_xomni.data.prompts``). A row that *lacks* a key a reward requires is a failure of that
reward for that row - counted, logged and handled by ``on_failure`` like any other - and the reward
is called only on the rows that have it. A key that is present with ``None`` (or an empty value)
is the row saying "this reward does not apply" (e.g. ``"text": null`` for a prompt that asks for no
text): the reward then returns ``None`` for it, as before.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from PIL import Image

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[Image.Image], list[dict]], list[float | None]]
RewardFactory = Callable[..., RewardFn]

_REGISTRY: dict[str, RewardFactory] = {}

# Modules that register the built-in rewards. They are imported on first registry lookup, not at
# import time, so importing the registry never pulls in transformers or onnxruntime.
_BUILTIN_MODULES = (
    "megatron_xomni.rewards.world_alignment",
    "megatron_xomni.rewards.ocr_text",
    "megatron_xomni.rewards.hpsv2",
    "megatron_xomni.rewards.vlm_judge",
)
_builtins_loaded = False


def register_reward(
    name: str, *, override: bool = False, required_fields: Sequence[str] | None = None
) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering ``factory`` under ``name``; ``factory(**kwargs)`` must return a reward fn.

    ``required_fields``: prompt-row keys the reward reads (stored on the factory; a factory class can
    declare its own ``required_fields`` attribute instead)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(factory: RewardFactory) -> RewardFactory:
        if name in _REGISTRY and not override and _REGISTRY[name] is not factory:
            raise ValueError(
                f"reward {name!r} is already registered; pick another name or pass override=True"
            )
        if required_fields is not None:
            factory.required_fields = tuple(required_fields)
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards (built-ins included)."""
    _load_builtins()
    return sorted(_REGISTRY)


def check_reward(name: str, **kwargs: Any) -> RewardFactory:
    """The factory of reward ``name`` after checking that ``kwargs`` fit its signature (nothing built:
    what a dry run can check). One-line ValueError naming the reward otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REGISTRY))}"
        )
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for reward {name!r}: {exc}") from None
    return factory


def required_fields(name: str, **kwargs: Any) -> tuple[str, ...]:
    """Prompt-row keys reward ``name`` (built with ``kwargs``) reads, without building it."""
    declared = getattr(check_reward(name, **kwargs), "required_fields", ())
    return tuple(declared(**kwargs) if callable(declared) else declared)


def check_reward_inputs(name: str, **kwargs: Any) -> None:
    """Check the local files reward ``name`` would load (its ``model_dir``, for rewards that take one):
    what a job checks when it starts, before anything is loaded. One-line ValueError otherwise."""
    factory = check_reward(name, **kwargs)
    if "model_dir" in inspect.signature(factory).parameters:
        from megatron_xomni.rewards._local import local_model_dir

        local_model_dir(kwargs.get("model_dir"), name)


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward registered as ``name`` with ``kwargs`` passed to its factory."""
    return check_reward(name, **kwargs)(**kwargs)


@dataclass
class RewardResult:
    """What one ``RewardEnsemble`` call produced for a batch of N images."""

    # Per-image combined reward (see the module docstring); None when no component gave a value.
    total: list[float | None]
    # Per component, per image raw value; None where not applicable or failed.
    components: dict[str, list[float | None]]
    # Per component, indices of images whose value failed (raised / invalid output).
    failures: dict[str, list[int]] = field(default_factory=dict)
    # Per component, the last error message seen in this call (for the log line).
    errors: dict[str, str] = field(default_factory=dict)
    # Per component, how many of its failures were rows lacking a field it requires.
    missing_fields: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Scalars for TensorBoard: mean total, mean of each component over images it scored,
        and failure counts."""
        out: dict[str, float] = {}
        totals = [t for t in self.total if t is not None]
        out["reward/total"] = sum(totals) / len(totals) if totals else float("nan")
        for name, values in self.components.items():
            vals = [v for v in values if v is not None]
            out[f"reward/{name}"] = sum(vals) / len(vals) if vals else float("nan")
            out[f"reward/{name}_failures"] = float(len(self.failures.get(name, [])))
            if name in self.missing_fields:
                out[f"reward/{name}_missing_fields"] = float(self.missing_fields[name])
        return out


class RewardEnsemble:
    """Weighted sum of registered rewards with per-image applicability and failure isolation.

    ``weights`` maps reward names to positive weights; ``component_kwargs`` maps a reward name
    to the dict of kwargs for its factory, e.g.
    ``RewardEnsemble({"ocr_text": 1.0, "hpsv2": 0.5}, hpsv2={"model_dir": "/ckpt/hpsv2"})``.
    """

    def __init__(
        self,
        weights: dict[str, float],
        on_failure: Literal["exclude", "zero"] = "exclude",
        **component_kwargs: dict[str, Any],
    ) -> None:
        if not weights:
            raise ValueError("RewardEnsemble needs at least one weighted reward, got an empty dict")
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(
                    f"reward weight for {name!r} must be a positive finite number, got {w!r}; "
                    "drop the reward instead of giving it weight 0"
                )
        unknown = sorted(set(component_kwargs) - set(weights))
        if unknown:
            raise ValueError(
                f"kwargs given for {', '.join(unknown)} which have no weight; add them to weights"
            )
        if on_failure not in ("exclude", "zero"):
            raise ValueError(f"on_failure must be 'exclude' or 'zero', got {on_failure!r}")
        for name, kw in component_kwargs.items():
            if not isinstance(kw, dict):
                raise ValueError(
                    f"kwargs for reward {name!r} must be a dict of factory arguments, got {type(kw).__name__}"
                )
        self.weights = {name: float(w) for name, w in weights.items()}
        self.on_failure = on_failure
        self.required: dict[str, tuple[str, ...]] = {
            name: required_fields(name, **component_kwargs.get(name, {})) for name in self.weights
        }
        self.components: dict[str, RewardFn] = {
            name: get_reward(name, **component_kwargs.get(name, {})) for name in self.weights
        }
        # Running failure counts over the ensemble's lifetime, per component (for logging); the
        # missing-field ones are also counted on their own.
        self.failure_counts: Counter[str] = Counter()
        self.missing_field_counts: Counter[str] = Counter()

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], metas: Sequence[dict]
    ) -> RewardResult:
        n = len(images)
        if len(prompts) != n or len(metas) != n:
            raise ValueError(
                f"prompts, images and metas must have one entry per image, got {len(prompts)}, {n}, {len(metas)}"
            )
        prompts, images, metas = list(prompts), list(images), list(metas)
        components: dict[str, list[float | None]] = {}
        failures: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        missing_fields: dict[str, int] = {}
        for name, fn in self.components.items():
            values, failed, error, n_missing = self._run_on_rows_with_fields(name, fn, prompts, images, metas)
            components[name] = values
            if n_missing:
                missing_fields[name] = n_missing
                self.missing_field_counts[name] += n_missing
            if failed:
                failures[name] = failed
                errors[name] = error
                self.failure_counts[name] += len(failed)
                logger.warning(
                    "reward %r failed on %d/%d images (%s); %s", name, len(failed), n, error,
                    "excluded from their totals" if self.on_failure == "exclude" else "scored 0",
                )

        weight_total = sum(self.weights.values())
        totals: list[float | None] = []
        for i in range(n):
            acc = 0.0
            used = 0.0
            for name, w in self.weights.items():
                value = components[name][i]
                if value is None and self.on_failure == "zero" and i in failures.get(name, ()):
                    value = 0.0
                if value is None:
                    continue
                acc += w * value
                used += w
            totals.append(acc * weight_total / used if used > 0 else None)
        return RewardResult(total=totals, components=components, failures=failures, errors=errors,
                            missing_fields=missing_fields)

    def _run_on_rows_with_fields(
        self, name: str, fn: RewardFn, prompts: list[str], images: list[Image.Image], metas: list[dict]
    ) -> tuple[list[float | None], list[int], str, int]:
        """``_run_component`` on the rows that have every field ``name`` requires; the others fail.
        Returns (values, failed indices, error, number of rows lacking a field)."""
        need = self.required[name]
        lacking = {i: [f for f in need if not isinstance(m, dict) or f not in m] for i, m in enumerate(metas)}
        lacking = {i: missing for i, missing in lacking.items() if missing}
        if not lacking:
            return (*self._run_component(name, fn, prompts, images, metas), 0)
        keep = [i for i in range(len(metas)) if i not in lacking]
        values: list[float | None] = [None] * len(metas)
        failed, error = sorted(lacking), ""
        if keep:
            sub_values, sub_failed, error = self._run_component(
                name, fn, [prompts[i] for i in keep], [images[i] for i in keep], [metas[i] for i in keep])
            for i, v in zip(keep, sub_values):
                values[i] = v
            failed = sorted(failed + [keep[j] for j in sub_failed])
        first = min(lacking)
        row = metas[first].get("id", first) if isinstance(metas[first], dict) else first
        missing = f"{len(lacking)} row(s) lack field(s) {', '.join(repr(f) for f in lacking[first])} (e.g. row {row})"
        return values, failed, f"{missing}; {error}" if error else missing, len(lacking)

    @staticmethod
    def _run_component(
        name: str, fn: RewardFn, prompts: list[str], images: list[Image.Image], metas: list[dict]
    ) -> tuple[list[float | None], list[int], str]:
        """Call ``fn`` on the batch; on a batch-level error retry per image to isolate failures."""
        n = len(images)
        try:
            out = _validated(fn(prompts, images, metas), n)
        except Exception as exc:  # noqa: BLE001 - a reward must never crash the training step
            batch_error = f"{type(exc).__name__}: {exc}"
        else:
            failed = [i for i, v in enumerate(out) if v is _FAILED]
            values = [None if v is _FAILED else v for v in out]
            return values, failed, "non-finite value" if failed else ""
        if n == 1:
            return [None], [0], batch_error
        values: list[float | None] = []
        failed: list[int] = []
        error = batch_error
        for i in range(n):
            try:
                (value,) = _validated(fn([prompts[i]], [images[i]], [metas[i]]), 1)
            except Exception as exc:  # noqa: BLE001
                value, error = _FAILED, f"{type(exc).__name__}: {exc}"
            if value is _FAILED:
                failed.append(i)
                values.append(None)
            else:
                values.append(value)
        return values, failed, error


_FAILED = object()  # sentinel for an image whose value is unusable (NaN / inf / not a number)


def _validated(out: Any, n: int) -> list:
    """Check a reward's output has n entries; map non-finite / non-numeric entries to _FAILED."""
    if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise TypeError(f"reward returned {type(out).__name__}, expected a list of {n} floats or None")
    if len(out) != n:
        raise ValueError(f"reward returned {len(out)} values for {n} images")
    result: list = []
    for v in out:
        if v is None:
            result.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            result.append(_FAILED)
            continue
        result.append(f if math.isfinite(f) else _FAILED)
    return result
