"""Registry and RewardEnsemble: weighted sum, renormalisation and failure handling vs hand-computed values."""
import math

import pytest
from PIL import Image

from megatron_xomni.rewards import registry
from megatron_xomni.rewards.registry import RewardEnsemble, available_rewards, get_reward, register_reward


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Rewards registered by a test vanish afterwards; built-ins stay available."""
    registry._load_builtins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _table(name, values, fail_on=None):
    """Register a reward returning values[meta['i']]; raises for metas whose 'i' is in fail_on."""
    calls = []

    @register_reward(name)
    def factory(scale=1.0):
        def fn(prompts, images, metas):
            calls.append(len(images))
            out = []
            for m in metas:
                if fail_on and m["i"] in fail_on:
                    raise RuntimeError(f"judge crashed on image {m['i']}")
                v = values[m["i"]]
                out.append(None if v is None else v * scale)
            return out
        return fn

    return calls


def _batch(n):
    return [f"p{i}" for i in range(n)], [Image.new("RGB", (4, 4)) for _ in range(n)], [{"i": i} for i in range(n)]


def test_weighted_sum_and_renormalisation():
    _table("a", [0.5, 1.0, None, None])
    _table("b", [1.0, 0.0, 0.5, None])
    result = RewardEnsemble({"a": 2.0, "b": 1.0})(*_batch(4))
    # img0: 2*0.5 + 1*1.0 = 2.0 ; img1: 2*1.0 + 0 = 2.0
    # img2: only b applies -> 1*0.5 rescaled by (2+1)/1 = 1.5 ; img3: nothing applies -> None
    assert result.total == [pytest.approx(2.0), pytest.approx(2.0), pytest.approx(1.5), None]
    assert result.components == {"a": [0.5, 1.0, None, None], "b": [1.0, 0.0, 0.5, None]}
    assert result.failures == {}
    summary = result.summary()
    assert summary["reward/total"] == pytest.approx((2.0 + 2.0 + 1.5) / 3)
    assert summary["reward/a"] == pytest.approx(0.75) and summary["reward/b"] == pytest.approx(0.5)
    assert summary["reward/a_failures"] == 0.0


def test_component_kwargs_reach_the_factory():
    _table("a", [0.5, 1.0])
    result = RewardEnsemble({"a": 1.0}, a={"scale": 4.0})(*_batch(2))
    assert result.total == [pytest.approx(2.0), pytest.approx(4.0)]


@pytest.mark.parametrize("policy", ["exclude", "zero"])
def test_one_image_failing_is_isolated(policy):
    calls = _table("flaky", [0.2, 0.4, 0.6], fail_on={1})
    _table("steady", [1.0, 1.0, 0.0])
    ens = RewardEnsemble({"flaky": 3.0, "steady": 1.0}, on_failure=policy)
    result = ens(*_batch(3))
    # the batch call raised, then each image was retried alone: 1 call of 3 + 3 calls of 1
    assert calls == [3, 1, 1, 1]
    assert result.failures == {"flaky": [1]}
    assert "image 1" in result.errors["flaky"]
    assert result.components["flaky"] == [pytest.approx(0.2), None, pytest.approx(0.6)]
    assert result.total[0] == pytest.approx(3 * 0.2 + 1.0)
    assert result.total[2] == pytest.approx(3 * 0.6 + 0.0)
    # img1: exclude -> only steady, rescaled by 4/1 ; zero -> flaky counts as 0
    assert result.total[1] == pytest.approx(4.0 if policy == "exclude" else 1.0)
    assert ens.failure_counts["flaky"] == 1
    ens(*_batch(3))
    assert ens.failure_counts["flaky"] == 2


def test_whole_batch_failure_and_invalid_outputs():
    _table("down", [0.1, 0.1], fail_on={0, 1})
    _table("ok", [0.25, 0.75])

    @register_reward("nan")
    def nan_factory():
        return lambda p, im, m: [math.nan if x["i"] == 0 else 0.5 for x in m]

    @register_reward("short")
    def short_factory():
        return lambda p, im, m: [0.5]  # always one value, whatever the batch size

    ens = RewardEnsemble({"down": 1.0, "ok": 1.0, "nan": 2.0, "short": 1.0})
    result = ens(*_batch(2))
    assert result.failures["down"] == [0, 1]
    assert result.failures["nan"] == [0]
    # "short" fails on the batch (1 value for 2 images) but is right for single images
    assert "short" not in result.failures and result.components["short"] == [0.5, 0.5]
    # img0: ok 0.25 (w1) + short 0.5 (w1) -> 0.75 rescaled by 5/2 ; img1: ok 0.75 + nan 2*0.5 + short 0.5 = 2.25 rescaled by 5/4
    assert result.total == [pytest.approx(0.75 * 5 / 2), pytest.approx(2.25 * 5 / 4)]
    assert result.summary()["reward/down_failures"] == 2.0


def test_registry_errors():
    assert {"world_alignment", "ocr_text", "hpsv2", "vlm_judge"} <= set(available_rewards())
    _table("a", [1.0])
    with pytest.raises(ValueError, match="already registered"):
        _table("a", [2.0])
    with pytest.raises(ValueError, match="unknown reward 'zzz'"):
        get_reward("zzz")
    with pytest.raises(ValueError, match="positive finite"):
        RewardEnsemble({"a": 0.0})
    with pytest.raises(ValueError, match="no weight"):
        RewardEnsemble({"a": 1.0}, hpsv2={"model_dir": "x"})
    with pytest.raises(ValueError, match="at least one"):
        RewardEnsemble({})
    with pytest.raises(ValueError, match="on_failure"):
        RewardEnsemble({"a": 1.0}, on_failure="ignore")
    with pytest.raises(ValueError, match="one entry per image"):
        RewardEnsemble({"a": 1.0})(["p"], [], [{}])


def test_bad_factory_arguments_are_a_value_error():
    _table("a", [1.0])
    with pytest.raises(ValueError, match="bad arguments for reward 'a'"):
        get_reward("a", bogus=1)
