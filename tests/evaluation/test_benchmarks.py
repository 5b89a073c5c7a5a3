"""Benchmark loaders read sample files written here in the published formats."""
import csv
import json

import pytest

from megatron_xomni.evaluation.benchmarks import (
    load_benchmark,
    load_dpg_bench,
    load_geneval,
    load_longtext_bench,
)

GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a dog"},
]


def test_geneval(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GENEVAL_ROWS) + "\n\n", encoding="utf-8")
    prompts = load_geneval(path)
    assert [p.id for p in prompts] == ["00000", "00001", "00002"]
    assert [p.prompt for p in prompts] == [r["prompt"] for r in GENEVAL_ROWS]
    assert prompts[1].meta == {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                               "exclude": [{"class": "clock", "count": 3}]}
    assert prompts[2].meta["include"][1]["position"] == ["left of", 0]
    assert load_geneval(tmp_path) == prompts  # a folder holding the file works too
    assert load_benchmark("geneval", path) == prompts


def test_geneval_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation_metadata"):
        load_geneval(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GENEVAL_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_geneval(bad)
    bad.write_text(json.dumps({"tag": "colors", "prompt": "a red car"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing field.*include"):
        load_geneval(bad)
    bad.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_geneval(bad)


DPG_COLUMNS = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
               "category_detailed", "tuple", "question_natural_language"]
DPG_ROWS = [
    ["partiprompts1", "A red truck on a beach.", "truck, beach", "1", "0", "entity", "whole",
     "entity - whole (truck)", "Is there a truck?"],
    ["partiprompts1", "A red truck on a beach.", "truck, beach", "2", "1", "attribute", "color",
     "attribute - color (truck, red)", "Is the truck red?"],
    ["partiprompts1", "A red truck on a beach.", "truck, beach", "3", "1,2", "relation", "spatial",
     "relation - spatial (truck, beach, on)", "Is the red truck on the beach?"],
    ["midjourney7", "Two owls at night.", "owls", "1", "0", "entity", "whole", "entity - whole (owls)", "Are there owls?"],
]


def _write_dpg_csv(path):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DPG_COLUMNS)
        writer.writerows(DPG_ROWS)


def test_dpg_bench_csv_and_prompts(tmp_path):
    _write_dpg_csv(tmp_path / "dpg_bench.csv")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "partiprompts1.txt").write_text("A red truck on a sandy beach at dusk.\n", encoding="utf-8")
    (tmp_path / "prompts" / "extra9.txt").write_text("A lone lighthouse.", encoding="utf-8")
    prompts = load_dpg_bench(tmp_path)
    assert [p.id for p in prompts] == ["partiprompts1", "midjourney7", "extra9"]
    # the .txt prompt wins over the CSV copy; questions come from the CSV
    assert prompts[0].prompt == "A red truck on a sandy beach at dusk."
    qs = prompts[0].meta["questions"]
    assert [q["proposition_id"] for q in qs] == [1, 2, 3]
    assert [q["dependency"] for q in qs] == [[0], [1], [1, 2]]
    assert qs[2]["question"] == "Is the red truck on the beach?"
    assert qs[1]["category_broad"] == "attribute" and qs[1]["tuple"] == "attribute - color (truck, red)"
    assert prompts[1].prompt == "Two owls at night." and len(prompts[1].meta["questions"]) == 1
    assert prompts[2].meta["questions"] == []


def test_dpg_bench_single_sources_and_errors(tmp_path):
    csv_path = tmp_path / "dpg_bench.csv"
    _write_dpg_csv(csv_path)
    assert [p.id for p in load_dpg_bench(csv_path)] == ["partiprompts1", "midjourney7"]
    only_prompts = tmp_path / "p_only"
    (only_prompts / "prompts").mkdir(parents=True)
    (only_prompts / "prompts" / "b.txt").write_text("second", encoding="utf-8")
    (only_prompts / "prompts" / "a.txt").write_text("first", encoding="utf-8")
    assert [(p.id, p.prompt) for p in load_dpg_bench(only_prompts)] == [("a", "first"), ("b", "second")]

    with pytest.raises(FileNotFoundError, match="neither prompts/ nor dpg_bench.csv"):
        load_dpg_bench(tmp_path / "p_only" / "prompts")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing column.*item_id"):
        load_dpg_bench(bad)
    bad.write_text("item_id,text,proposition_id,dependency,question_natural_language\nx,t,1,a;b,Is it?\n", encoding="utf-8")
    with pytest.raises(ValueError, match="dependency"):
        load_dpg_bench(bad)


EN_ROWS = [
    {"prompt_id": "0000", "prompt": 'A shop sign that reads "Grand Opening Sale"', "text": ["Grand Opening", "Sale"],
     "category": "signboard", "length": "short"},
    {"prompt_id": "0001", "prompt": 'A slide titled "Quarterly Results"', "text": "Quarterly Results", "category": "slide"},
]
ZH_ROWS = [{"prompt_id": "0000", "prompt": "黑板上写着“欢迎光临”", "text": "欢迎光临", "category": "blackboard"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_longtext_bench(tmp_path):
    _write_jsonl(tmp_path / "text_prompts.jsonl", EN_ROWS)
    _write_jsonl(tmp_path / "text_prompts_zh.jsonl", ZH_ROWS)
    en = load_longtext_bench(tmp_path / "text_prompts.jsonl")
    assert [p.id for p in en] == ["0000", "0001"]
    assert en[0].meta == {"prompt_id": "0000", "category": "signboard", "length": "short",
                          "text": "Grand Opening Sale", "lang": "en"}
    assert en[1].prompt == 'A slide titled "Quarterly Results"'
    zh = load_longtext_bench(tmp_path, lang="zh")
    assert [(p.id, p.meta["text"], p.meta["lang"]) for p in zh] == [("0000", "欢迎光临", "zh")]
    both = load_longtext_bench(tmp_path)
    assert [p.id for p in both] == ["en/0000", "en/0001", "zh/0000"]
    assert both[2].meta["prompt_id"] == "0000"
    # a JSON array of the same objects is accepted; language detected from the text
    (tmp_path / "mixed.json").write_text(json.dumps(ZH_ROWS, ensure_ascii=False), encoding="utf-8")
    assert load_longtext_bench(tmp_path / "mixed.json")[0].meta["lang"] == "zh"


def test_longtext_bench_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_prompts"):
        load_longtext_bench(tmp_path)
    with pytest.raises(FileNotFoundError, match="zh prompts"):
        load_longtext_bench(tmp_path, lang="zh")
    bad = tmp_path / "text_prompts.jsonl"
    _write_jsonl(bad, [{"prompt_id": "0000", "prompt": "a sign"}])
    with pytest.raises(ValueError, match=r"text_prompts.jsonl:1: missing field.*text"):
        load_longtext_bench(bad)
    _write_jsonl(bad, [{"prompt_id": "0000", "prompt": "a sign", "text": 5}])
    with pytest.raises(ValueError, match="'text' must be a string or list"):
        load_longtext_bench(bad)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", bad)


def test_dpg_bench_bad_proposition_id(tmp_path):
    bad = tmp_path / "dpg_bench.csv"
    bad.write_text("item_id,text,proposition_id,question_natural_language\nx,t,one,Is it?\ny,u\n", encoding="utf-8")
    with pytest.raises(ValueError, match="proposition_id 'one' is not an integer"):
        load_dpg_bench(bad)
    bad.write_text("item_id,text,question_natural_language\nx,t,Is it?\n", encoding="utf-8")
    with pytest.raises(ValueError, match="proposition_id '' is not an integer"):
        load_dpg_bench(bad)
