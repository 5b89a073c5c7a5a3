"""Prompt sources: .txt / .jsonl / benchmark files / the world's streams behind one indexed interface."""
from __future__ import annotations

import json

import pytest

from megatron_xomni.data.prompts import PromptConfig, check_fields, make_prompt_source

LINES = ["a red circle", "", "two blue squares  ", "a sign that says OPEN", "three green triangles", "a cat"]


def _txt(tmp_path, lines=LINES):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _jsonl(tmp_path, rows, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_txt_rows_in_file_order_and_passes(tmp_path):
    src = make_prompt_source(PromptConfig(source=str(_txt(tmp_path)), shuffle=False))
    want = [(str(n), line.strip()) for n, line in enumerate(LINES, 1) if line.strip()]
    assert src.num_rows == 5
    got = [(r["id"], r["prompt"]) for r in src.rows(range(12))]
    assert got == want + want + want[:2]  # passes repeat the file
    assert set(src[0]) == {"id", "prompt"}


def test_shuffled_passes_are_permutations_deterministic_and_random_access(tmp_path):
    path = _txt(tmp_path, [f"prompt {i}" for i in range(50)])
    a = make_prompt_source(PromptConfig(source=str(path), seed=3))
    passes = [[a[e * 50 + k]["prompt"] for k in range(50)] for e in range(3)]
    for p in passes:
        assert sorted(p) == sorted(f"prompt {i}" for i in range(50))  # each pass reads every row once
    assert passes[0] != passes[1] != passes[2]  # a new order every pass
    assert passes[0] != [f"prompt {i}" for i in range(50)]
    # another process (a new source) asking out of order - a resumed run - gets the same rows
    b = make_prompt_source(PromptConfig(source=str(path), seed=3))
    for i in [137, 3, 99, 51, 0, 149]:
        assert b[i] == a[i]
    other = make_prompt_source(PromptConfig(source=str(path), seed=4))
    assert [other[k]["prompt"] for k in range(50)] != passes[0]
    with pytest.raises(IndexError):
        a[-1]


def test_jsonl_rows_keep_reward_fields(tmp_path):
    rows = [{"prompt": "two red circles", "include": [{"shape": "circle", "count": 2, "color": "red"}], "text": None},
            {"prompt": "a sign that says OPEN", "text": "OPEN", "id": "sign"},
            {"prompt": " a cat ", "lang": "en", "id": 7}]
    src = make_prompt_source(PromptConfig(source=str(_jsonl(tmp_path, rows)), shuffle=False))
    got = src.rows(range(3))
    assert got[0] == {"id": "1", **rows[0]}
    assert got[1] == {**rows[1], "id": "sign"}
    assert got[2] == {"prompt": "a cat", "lang": "en", "id": "7"}
    assert src.fields() == {"id", "prompt", "include", "text", "lang"}
    got[0]["prompt"] = "changed"
    assert src[0]["prompt"] == "two red circles"  # rows are copies


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "ok"}', '{"text": "no prompt"}'], r"prompts.jsonl:2: expected a non-empty string \"prompt\""),
    (['{"prompt": "ok"}', '{"prompt": "x"'], r"prompts.jsonl:2: invalid JSON"),
    (['["prompt"]'], r"prompts.jsonl:1: expected a JSON object per line"),
    (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], r"id 'x' appears more than once"),
    (['{"prompt": "a", "id": [1]}'], r"prompts.jsonl:1: id must be a string or an integer"),
    ([], r"prompts.jsonl is empty"),
])
def test_bad_jsonl_is_one_line(tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message) as err:
        make_prompt_source(PromptConfig(source=str(path)))
    assert "\n" not in str(err.value)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        PromptConfig(source="prompts.csv").validate()
    PromptConfig(source="p.txt", skills=["counting"]).validate()  # world-only knobs are ignored for files
    with pytest.raises(ValueError, match="unknown world skill"):
        PromptConfig(skills=["juggling"]).validate()
    with pytest.raises(ValueError, match="prompts.format='csv'"):
        PromptConfig(source="p.txt", format="csv").validate()
    with pytest.raises(ValueError, match="prompts.split='test'"):
        PromptConfig(split="test").validate()
    with pytest.raises(ValueError, match="does not exist"):
        make_prompt_source(PromptConfig(source=str(tmp_path / "nope.jsonl")))


def test_benchmark_prompt_files(tmp_path):
    geneval = _jsonl(tmp_path, [
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "exclude": [{"class": "car", "count": 2}],
         "prompt": "a photo of a red car"}], "evaluation_metadata.jsonl")
    src = make_prompt_source(PromptConfig(source=str(geneval), format="geneval", shuffle=False))
    assert src.rows(range(2)) == [
        {"id": "00000", "prompt": "a photo of two dogs", "tag": "counting", "geneval_include": [{"class": "dog", "count": 2}]},
        {"id": "00001", "prompt": "a photo of a red car", "tag": "colors",
         "geneval_include": [{"class": "car", "count": 1, "color": "red"}], "geneval_exclude": [{"class": "car", "count": 2}]}]
    assert "include" not in src.fields()  # GenEval's COCO requests never pass for the world detector's

    longtext = _jsonl(tmp_path, [{"prompt_id": "0001", "prompt": "a poster reading GRAND OPENING", "text": ["GRAND", "OPENING"]}],
                      "text_prompts.jsonl")
    row = make_prompt_source(PromptConfig(source=str(longtext), format="longtext_bench"))[0]
    assert row == {"id": "0001", "prompt": "a poster reading GRAND OPENING", "prompt_id": "0001", "text": "GRAND OPENING",
                   "lang": "en"}

    dpg = tmp_path / "dpg_bench"
    (dpg / "prompts").mkdir(parents=True)
    (dpg / "prompts" / "item1.txt").write_text("a cozy cabin in the snow\n")
    row = make_prompt_source(PromptConfig(source=str(dpg), format="dpg_bench"))[0]
    assert row == {"id": "item1", "prompt": "a cozy cabin in the snow", "questions": []}


def test_world_streams_are_the_world_samples():
    from megatron_xomni.world import held_out_prompts, sample_world

    skills = ["counting", "text", "position"]
    train = make_prompt_source(PromptConfig(skills=skills, seed=5), height=64, width=96)
    for i in [0, 1, 2, 10]:
        s = sample_world(i, seed=5, height=64, width=96, skill=skills[i % 3])
        assert train[i] == {**s.meta, "id": f"world/train/5/{i}", "prompt": s.caption}
    held = make_prompt_source(PromptConfig(split="heldout", seed=12345, skills=skills))
    for i, s in enumerate(held_out_prompts(4, seed=12345, skills=skills)):
        assert held[i]["prompt"] == s.caption and held[i]["include"] == s.meta["include"]
    assert {"include", "text", "skill"} <= train.fields()
    no_text = make_prompt_source(PromptConfig(skills=["counting", "colors"]))
    assert "text" not in no_text.fields() and "include" in no_text.fields()


def test_check_fields_refuses_a_source_no_row_of_which_has_a_field(tmp_path):
    src = make_prompt_source(PromptConfig(source=str(_txt(tmp_path))))
    with pytest.raises(ValueError, match=r"no row has a value for the 'text' field, which reward 'ocr_text' reads") as err:
        check_fields(src, {"hpsv2": (), "ocr_text": ("text",)})
    assert "\n" not in str(err.value)
    one = make_prompt_source(PromptConfig(source=str(_jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", "text": "B"}]))))
    check_fields(one, {"ocr_text": ("text",)})  # one row suffices; the other is a counted failure at scoring
    nulls = make_prompt_source(PromptConfig(source=str(_jsonl(tmp_path, [{"prompt": "a", "text": None}], "n.jsonl"))))
    with pytest.raises(ValueError, match="no row has a value for the 'text' field"):
        check_fields(nulls, {"ocr_text": ("text",)})  # null everywhere: the reward could never score


def test_only_the_world_adapters_import_the_world():
    """The world is one data source among others: besides the world package itself, only the data
    adapter, the world reward and the world benchmark import it (imports inside functions included)."""
    import ast
    from pathlib import Path

    import megatron_xomni

    root = Path(megatron_xomni.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("world/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "megatron_xomni.world" or n.startswith("megatron_xomni.world.") for n in names):
                importers.add(rel)
    assert importers == {"data/world_source.py", "rewards/world_alignment.py", "evaluation/world_bench.py"}
