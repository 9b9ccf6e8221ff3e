"""The demo corpus generator: determinism, C-Eval layout, correctness of the exam, phrasing
kept apart between pretraining / SFT / exam, self-cognition and the planted dirty data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from steelworks.data.config import DemoCorpusConfig
from steelworks.data.demo_corpus import (
    _SELF_EN,
    _SELF_EN_CREATOR,
    _SELF_ZH,
    _SELF_ZH_CREATOR,
    ATTRIBUTES,
    DEMO_SUBJECTS,
    EXAM_COLUMNS,
    LETTERS,
    generate,
)
from steelworks.data.exam_prompt import build_prompt, zero_shot_prompt

SMALL = dict(num_entities=12, pretrain_renderings=10, sft_questions_per_fact=2,
             sft_exam_per_fact=2, self_cognition_samples=24, dev_per_subject=2, val_per_subject=2,
             model_name="Tiny-Test-LM", model_author="Test-Lab", planted_duplicates=5,
             planted_junk=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row, strict=True)) for row in reader]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[DemoCorpusConfig, Path, dict]:
    cfg = DemoCorpusConfig(**SMALL)
    out = tmp_path_factory.mktemp("demo")
    return cfg, out, generate(cfg, out)


@pytest.fixture(scope="module")
def world(corpus) -> dict:
    return json.loads((corpus[1] / "world.json").read_text(encoding="utf-8"))


def test_same_seed_byte_identical_other_seed_differs(corpus, tmp_path):
    cfg, out, summary = corpus
    again = generate(DemoCorpusConfig(**SMALL), tmp_path / "again")
    first, second = _files(out), _files(tmp_path / "again")
    assert first == second and again == summary
    assert sorted(first) == summary["files"]  # the summary lists exactly what was written
    generate(DemoCorpusConfig(**{**SMALL, "seed": cfg.seed + 1}), tmp_path / "other")
    other = _files(tmp_path / "other")
    assert sorted(other) == sorted(first)
    for name in ("world.json", "pretrain.jsonl", "sft.jsonl", "exam/demo_zoology_test.csv"):
        assert other[name] != first[name], name
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries behind


def test_record_schemas(corpus):
    _, out, summary = corpus
    pretrain = _jsonl(out / "pretrain.jsonl")
    assert all(set(r) == {"id", "text", "lang"} and r["lang"] in ("zh", "en") for r in pretrain)
    assert len({r["id"] for r in pretrain}) == len(pretrain) == summary["pretrain"]["docs"]
    langs = Counter(r["lang"] for r in pretrain)
    assert langs["zh"] > 1.5 * langs["en"] > 0  # Chinese-first
    sft = _jsonl(out / "sft.jsonl")
    assert len({r["id"] for r in sft}) == len(sft) == summary["sft"]["samples"]
    for r in sft:
        assert set(r) == {"id", "messages", "task_type"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    facts = summary["facts"]
    assert Counter(r["task_type"] for r in sft) == {
        "qa": facts * SMALL["sft_questions_per_fact"],
        "exam": facts * SMALL["sft_exam_per_fact"],
        "self_cognition": SMALL["self_cognition_samples"],
    } == summary["sft"]["per_task_type"]


def test_exam_layout_and_balanced_letters(corpus, world):
    _, out, summary = corpus
    assert json.loads((out / "exam/subject_mapping.json").read_text("utf-8")) == DEMO_SUBJECTS
    assert all(len(v) == 3 and v[2] in ("STEM", "Social Science", "Humanities", "Other")
               for v in DEMO_SUBJECTS.values())
    asks = DemoCorpusConfig().exam_questions_per_fact
    assert asks == 2  # the default asks each val/test fact in both exam phrasings
    all_test = Counter()
    for subject in DEMO_SUBJECTS:
        n_facts = sum(1 for f in world["facts"] if f["subject"] == subject)
        dev, val = SMALL["dev_per_subject"], SMALL["val_per_subject"]
        for split, n in (("dev", dev), ("val", val * asks), ("test", (n_facts - dev - val) * asks)):
            raw = (out / f"exam/{subject}_{split}.csv").read_text("utf-8")
            assert raw.splitlines()[0] == ",".join(EXAM_COLUMNS)
            header, rows = _csv(out / f"exam/{subject}_{split}.csv")
            assert tuple(header) == EXAM_COLUMNS and len(rows) == n
            assert summary["exam"]["per_subject"][subject][split] == n
            assert [r["id"] for r in rows] == [str(i) for i in range(n)]
            letters = Counter(r["answer"] for r in rows)
            assert set(letters) <= set(LETTERS)
            # balanced: every letter is correct n//4 or n//4 + 1 times
            assert all(n // 4 <= letters[x] <= n // 4 + 1 for x in LETTERS), letters
            assert all(r["explanation"] and r["answer"] in r["explanation"] for r in rows)
            if split == "test":
                all_test.update(letters)
    assert sum(all_test.values()) == summary["exam"]["test"]
    assert dict(all_test) == summary["exam"]["test_answers"]
    assert summary["exam"]["test"] == summary["exam"]["test_facts"] * asks


def test_exam_answers_match_world(corpus, world):
    out = corpus[1]
    rows = {}
    for subject in DEMO_SUBJECTS:
        for split in ("dev", "val", "test"):
            for r in _csv(out / f"exam/{subject}_{split}.csv")[1]:
                rows[(subject, split, r["id"])] = r
    entities = {e["id"]: e for e in world["entities"]}
    splits = Counter()
    for fact in world["facts"]:
        loc = fact["exam"]
        splits[loc["split"]] += 1
        # dev asks once; val and test ask in both exam phrasings, never twice alike
        assert len(loc["ids"]) == (1 if loc["split"] == "dev" else 2)
        asked = [rows.pop((loc["subject"], loc["split"], i)) for i in loc["ids"]]
        assert len({row["question"] for row in asked}) == len(asked)
        for row in asked:
            options = [row[x] for x in LETTERS]
            assert row[row["answer"]] == fact["value"]["zh"]
            assert len(set(options)) == 4  # distractors distinct and never the answer
            allowed = {v["zh"] for v in world["attributes"][fact["attribute"]]["values"]}
            assert set(options) <= allowed  # distractors: other values of the same attribute
            assert entities[fact["entity"]]["zh"] in row["question"]
    assert not rows  # every row belongs to exactly one fact
    n_subjects = len(DEMO_SUBJECTS)
    assert splits == {"dev": SMALL["dev_per_subject"] * n_subjects,
                      "val": SMALL["val_per_subject"] * n_subjects,
                      "test": len(world["facts"]) - (SMALL["dev_per_subject"]
                                                     + SMALL["val_per_subject"]) * n_subjects}


def test_world_names_and_values_are_unambiguous(world):
    names = [e["zh"] for e in world["entities"]] + [e["en"] for e in world["entities"]]
    for a in names:
        assert sum(a.lower() in b.lower() for b in names) == 1, a  # not inside another name
    for key, attr in world["attributes"].items():
        values = [v["zh"] for v in attr["values"]]
        assert len(values) >= 4
        for v in values:
            assert sum(v in w for w in values) == 1, v  # option texts never nest
            if key != "hometown":  # hometowns are the city names themselves
                assert not any(v in e["zh"] for e in world["entities"]), v


def test_template_families_are_disjoint():
    for attr in ATTRIBUTES:
        assert len(attr.pretrain_zh) >= 6 and len(attr.pretrain_en) >= 6, attr.key
        others = [*attr.pretrain_zh, *attr.pretrain_en, *attr.qa_zh, *attr.qa_en, *attr.practice]
        every = [t for a in ATTRIBUTES for t in (*a.pretrain_zh, *a.pretrain_en, *a.qa_zh,
                                                 *a.qa_en, *a.practice)]
        for template in attr.exam:
            assert template not in others
            # the longest literal stretch of an exam question appears in no other template
            longest = max(template.replace("{v}", "{e}").split("{e}"), key=len)
            assert len(longest) >= 6 and not any(longest in t for t in every), template
        assert not set(attr.practice) & set(attr.qa_zh + attr.pretrain_zh)
    assert len(_SELF_ZH + _SELF_ZH_CREATOR) >= 8 and len(_SELF_EN + _SELF_EN_CREATOR) >= 5


def test_exam_questions_never_seen_in_training_text(corpus):
    out = corpus[1]
    seen = [r["text"] for r in _jsonl(out / "pretrain.jsonl")]
    seen += [m["content"] for r in _jsonl(out / "sft.jsonl") for m in r["messages"]]
    blob = "\n".join(seen)
    questions = [r["question"] for s in DEMO_SUBJECTS for split in ("dev", "val", "test")
                 for r in _csv(out / f"exam/{s}_{split}.csv")[1]]
    assert questions and not [q for q in questions if q in blob]


def test_self_cognition_names_model_and_author(corpus):
    out = corpus[1]
    samples = [r for r in _jsonl(out / "sft.jsonl") if r["task_type"] == "self_cognition"]
    assert len(samples) == SMALL["self_cognition_samples"]
    creator_qs = set(_SELF_ZH_CREATOR + _SELF_EN_CREATOR)
    assert {r["messages"][0]["content"] for r in samples} <= set(
        _SELF_ZH + _SELF_EN) | creator_qs
    n_creator = 0
    for r in samples:
        question, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert SMALL["model_name"] in answer
        if question in creator_qs:
            n_creator += 1
            assert SMALL["model_author"] in answer
    assert 0 < n_creator < len(samples)
    assert any(r["messages"][0]["content"] in _SELF_EN + _SELF_EN_CREATOR for r in samples)


def test_exam_prompt_is_the_ceval_layout():
    opts = {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}
    assert zero_shot_prompt("虚构地理", "问题？", opts) == (
        "以下是中国关于虚构地理考试的单项选择题，请选出其中的正确答案。\n\n问题？\n"
        "A. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    with pytest.raises(ValueError, match="A, B, C, D"):
        zero_shot_prompt("x", "q", {"A": "1", "B": "2", "C": "3"})
    # The eval stage builds the same zero-shot text from a benchmark item, or the SFT model
    # meets a new format.
    from steelworks.data.benchmarks import Item, Subject
    from steelworks.evals.prompts import item_prompts

    item = Item("s", "0", "问题？", opts, "A", "", "f.csv", 2)
    assert build_prompt("虚构地理", item) == zero_shot_prompt("虚构地理", "问题？", opts)
    subject = Subject("s", "s", "虚构地理", "STEM")
    assert item_prompts([item], [subject], 0) == [zero_shot_prompt("虚构地理", "问题？", opts)]


def test_sft_exam_letter_answers(tmp_path):
    from steelworks.data.config import DemoCorpusConfig
    from steelworks.data.demo_corpus import generate

    generate(DemoCorpusConfig(num_entities=12, pretrain_renderings=2, sft_exam_answer="letter"),
             tmp_path)
    items = [r for r in _jsonl(tmp_path / "sft.jsonl") if r["task_type"] == "exam"]
    assert items and all(r["messages"][1]["content"] in LETTERS for r in items)


def test_sft_exam_items_use_the_exam_prompt(corpus, world):
    out = corpus[1]
    facts_by_entity: dict[str, set[str]] = {}
    names = {e["id"]: e["zh"] for e in world["entities"]}
    for f in world["facts"]:
        facts_by_entity.setdefault(names[f["entity"]], set()).add(f["value"]["zh"])
    items = [r for r in _jsonl(out / "sft.jsonl") if r["task_type"] == "exam"]
    subject_zh = {m[1] for m in DEMO_SUBJECTS.values()}
    letters = Counter()
    for r in items:
        prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        head, rest = prompt.split("\n\n", 1)
        question, *option_lines, cue = rest.split("\n")
        assert len(option_lines) == 4
        zh = head.removeprefix("以下是中国关于").removesuffix("考试的单项选择题，请选出其中的正确答案。")
        assert zh in subject_zh and cue == "答案："
        options = {line[0]: line[3:] for line in option_lines}
        assert prompt == zero_shot_prompt(zh, question, options)
        # The default answers with the option's text; resolve it to its letter.
        assert answer in options.values()
        answer = next(k for k, v in options.items() if v == answer)
        letters[answer] += 1
        entity = [n for n in facts_by_entity if n in question]
        assert len(entity) == 1 and options[answer] in facts_by_entity[entity[0]]
        assert len(set(options.values())) == 4
    assert max(letters.values()) - min(letters.values()) <= 1


def test_planted_duplicates_and_junk_are_counted(corpus):
    from steelworks.data.recipe import Recipe

    normalize = Recipe.default(5, 100_000).normalize
    _, out, summary = corpus
    texts = [normalize(r["text"]) for r in _jsonl(out / "pretrain.jsonl")]
    counts = Counter(texts)
    extra_copies = sum(c - 1 for c in counts.values())
    junk = [t for t in texts if len(t) < 5]  # DataConfig.min_chars default
    pt = summary["pretrain"]
    assert extra_copies == pt["planted_duplicates"] == SMALL["planted_duplicates"]
    assert len(junk) == pt["planted_junk"] == SMALL["planted_junk"]
    assert len(set(junk)) == len(junk) and all(len(t) <= pt["junk_max_chars"] for t in junk)
    assert pt["chars"] == sum(len(r["text"]) for r in _jsonl(out / "pretrain.jsonl"))


def test_exam_loads_with_the_eval_loader(corpus):
    benchmarks = pytest.importorskip("steelworks.data.benchmarks")
    for split in ("dev", "val", "test"):
        subjects, items = benchmarks.load_ceval_layout(corpus[1] / "exam", split)
        assert [s.name for s in subjects] == list(DEMO_SUBJECTS)
        assert sum(len(v) for v in items.values()) == corpus[2]["exam"][split]
        assert all(item.answer in LETTERS for v in items.values() for item in v)


def test_default_config_sizes(tmp_path):
    s = generate(DemoCorpusConfig(), tmp_path)
    assert 500_000 <= s["pretrain"]["chars"] <= 1_500_000
    assert s["exam"]["test"] >= 100  # issue 20: the reported exam is not a coin toss
    assert s["facts"] == sum(s["facts_per_subject"].values())


def test_config_validation():
    with pytest.raises(ValueError, match="num_entities"):
        DemoCorpusConfig(num_entities=8)
    with pytest.raises(ValueError, match="dev_per_subject"):
        generate(DemoCorpusConfig(num_entities=12, dev_per_subject=12), "/nonexistent/never")
    with pytest.raises(ValueError, match="val_per_subject"):
        generate(DemoCorpusConfig(num_entities=12, val_per_subject=9), "/nonexistent/never")
    with pytest.raises(ValueError, match="exam_questions_per_fact"):
        DemoCorpusConfig(exam_questions_per_fact=3)
