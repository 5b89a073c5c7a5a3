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


@pytest.mark.parametrize("policy", ["exclude", "zero"])
def test_rows_lacking_a_required_field_are_counted_failures(policy, caplog):
    seen = []

    @register_reward("needs_text", required_fields=("text",))
    def needs_text():
        def fn(prompts, images, metas):
            seen.append([m["i"] for m in metas])
            return [None if m["text"] is None else len(m["text"]) / 10 for m in metas]
        return fn

    _table("steady", [1.0, 0.5, 0.25, 0.0])
    ens = RewardEnsemble({"needs_text": 2.0, "steady": 1.0}, on_failure=policy)
    rows = [{"i": 0, "id": "r0", "text": "hello"}, {"i": 1, "id": "r1"}, {"i": 2, "id": "r2", "text": None},
            {"i": 3, "id": "r3"}]
    with caplog.at_level("WARNING", logger="megatron_xomni.rewards.registry"):
        result = ens(["p"] * 4, [Image.new("RGB", (4, 4))] * 4, rows)
    assert seen == [[0, 2]]  # the reward only ever sees the rows that have its field
    assert result.failures == {"needs_text": [1, 3]} and result.missing_fields == {"needs_text": 2}
    assert result.components["needs_text"] == [pytest.approx(0.5), None, None, None]
    # row 2 says text: null (not applicable): steady alone, rescaled by 3/1; rows 1, 3 lack it (failures)
    fail = 3.0 if policy == "exclude" else 1.0  # exclude: steady rescaled by 3/1 ; zero: 2*0 + steady
    assert result.total == [pytest.approx(2 * 0.5 + 1.0), pytest.approx(0.5 * fail), pytest.approx(0.25 * 3),
                            pytest.approx(0.0)]
    assert ens.failure_counts["needs_text"] == 2 and ens.missing_field_counts["needs_text"] == 2
    assert result.summary()["reward/needs_text_missing_fields"] == 2.0
    assert "2 row(s) lack field(s) 'text' (e.g. row r1)" in caplog.text


def test_required_fields_are_declared_without_building():
    assert registry.required_fields("world_alignment") == ("include",)
    assert registry.required_fields("ocr_text") == ("text",)
    assert registry.required_fields("ocr_text", text_key="words") == ("words",)  # a function of the kwargs
    assert registry.required_fields("hpsv2", model_dir="nowhere") == ()  # nothing loaded: no error for the path
    with pytest.raises(ValueError, match="bad arguments for reward 'ocr_text'"):
        registry.required_fields("ocr_text", bogus=1)
    with pytest.raises(ValueError, match="reward 'hpsv2' needs model_dir"):
        registry.check_reward_inputs("hpsv2")
    with pytest.raises(ValueError, match="no config.json"):
        registry.check_reward_inputs("vlm_judge", model_dir="/nowhere/judge")
    registry.check_reward_inputs("ocr_text")  # no local files to check
