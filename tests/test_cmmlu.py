"""CMMLU loading, layout detection, the packaged subject maps, and the groups they feed.

The real CMMLU dev split in ../shared is checked against counts taken here with the csv
module alone, so a loader that lost or invented rows could not agree with them by sharing a
bug.  Malformed rows are hand-made fixtures: each must be an error naming file and line.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from steelworks.data.benchmarks import (
    CEVAL_HARD_SUBJECTS,
    BenchmarkFormatError,
    Subject,
    ceval_subjects,
    cmmlu_subjects,
    detect_layout,
    load_benchmark,
    load_ceval_layout,
    load_cmmlu_layout,
)
from steelworks.data.subjects import (
    CATEGORIES,
    CEVAL_SUBJECTS,
    CMMLU_CHINA_SPECIFIC,
    CMMLU_SUBJECTS,
)
from steelworks.evals.report import aggregate, render_markdown

HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _cmmlu_dir(shared_dir: Path) -> Path:
    root = shared_dir / "benchmarks" / "cmmlu"
    if not (root / "dev").is_dir():
        pytest.skip(f"{root / 'dev'} is absent; the real CMMLU dev split is needed")
    return root


# ---- the packaged maps -------------------------------------------------------------------


def test_ceval_map_has_52_subjects_and_8_hard() -> None:
    assert len(CEVAL_SUBJECTS) == 52
    assert len(CEVAL_HARD_SUBJECTS) == 8 and CEVAL_HARD_SUBJECTS <= set(CEVAL_SUBJECTS)
    assert {info.category for info in CEVAL_SUBJECTS.values()} == set(CATEGORIES)
    subjects = ceval_subjects()
    assert sorted(s.name for s in subjects if s.hard) == sorted(CEVAL_HARD_SUBJECTS)
    assert CEVAL_SUBJECTS["college_physics"] == ("College Physics", "大学物理", "STEM")


def test_cmmlu_map_has_67_subjects_and_china_specific_flags() -> None:
    assert len(CMMLU_SUBJECTS) == 67
    assert {info.category for info in CMMLU_SUBJECTS.values()} == set(CATEGORIES)
    assert len(CMMLU_CHINA_SPECIFIC) == 15
    for name, info in CMMLU_SUBJECTS.items():  # the flag and CMMLU's sub-category agree
        assert info.china_specific == ("china specific" in info.subcategories), name
    subjects = {s.name: s for s in cmmlu_subjects()}
    # Same file stem as a C-Eval Hard subject, but CMMLU's is not C-Eval Hard.
    assert subjects["high_school_physics"].hard is False
    assert subjects["ancient_chinese"].china_specific and subjects["ancient_chinese"].benchmark == "cmmlu"
    assert subjects["chinese_civil_service_exam"].name_en == "Chinese Civil Service Exam"


def test_packaged_maps_match_the_shared_files(shared_dir: Path) -> None:
    ceval = json.loads((shared_dir / "benchmarks/ceval/subject_mapping.json").read_text("utf-8"))
    assert {k: list(v) for k, v in CEVAL_SUBJECTS.items()} == ceval
    cmmlu = json.loads((shared_dir / "benchmarks/cmmlu/subjects.json").read_text("utf-8"))
    assert set(cmmlu) == set(CMMLU_SUBJECTS)
    for name, facts in cmmlu.items():
        info = CMMLU_SUBJECTS[name]
        assert facts["category"] == [info.category], name
        assert (facts["name_zh"], facts["china_specific"]) == (info.name_zh, info.china_specific)
        assert facts["subcategories"] == list(info.subcategories), name


# ---- the real CMMLU dev split ------------------------------------------------------------


def test_real_cmmlu_dev_split_loads_every_row(shared_dir: Path) -> None:
    root = _cmmlu_dir(shared_dir)
    # Independent count: data rows per file, by the csv module, nothing of the loader's.
    expected: dict[str, int] = {}
    for path in sorted((root / "dev").glob("*.csv")):
        with open(path, encoding="utf-8-sig", newline="") as f:
            expected[path.stem] = sum(1 for _ in csv.reader(f)) - 1
    assert len(expected) == 67 and set(expected.values()) == {5}  # as the README says

    subjects, items = load_cmmlu_layout(root, "dev")
    assert [s.name for s in subjects] == list(CMMLU_SUBJECTS)  # map order, none skipped
    assert {name: len(v) for name, v in items.items()} == expected
    assert sum(len(v) for v in items.values()) == 335
    for s in subjects:
        info = CMMLU_SUBJECTS[s.name]
        assert (s.category, s.name_zh, s.china_specific) == (info.category, info.name_zh, info.china_specific)
        assert s.benchmark == "cmmlu" and not s.hard
    assert sum(s.china_specific for s in subjects) == 15

    first = items["agronomy"][0]
    assert (first.id, first.line, first.answer) == ("0", 2, "C")
    assert first.question == "肉牛屠宰后，胴体的哪个部位肉质较好"
    assert first.options == {"A": "胸", "B": "腹", "C": "大腿", "D": "小腿"}
    assert first.source == str(root / "dev" / "agronomy.csv") and first.explanation == ""
    assert all(it.answer in ("A", "B", "C", "D") for v in items.values() for it in v)

    assert detect_layout(root) == "cmmlu"
    assert load_benchmark(root, "dev") == (subjects, items)
    with pytest.raises(FileNotFoundError, match="no CMMLU 'val' split"):
        load_benchmark(root, "val")


def test_report_has_china_specific_group_on_real_subjects(shared_dir: Path) -> None:
    subjects, items = load_cmmlu_layout(_cmmlu_dir(shared_dir), "dev")
    # Answer A everywhere: correct exactly where the gold letter is A.
    preds = [{"subject": it.subject, "id": it.id, "answer": it.answer, "pred": "A",
              "scores": {}, "correct": it.answer == "A"} for v in items.values() for it in v]
    report = aggregate(preds, subjects)
    assert set(report["categories"]) == set(CATEGORIES) and "hard" not in report
    china = report["china_specific"]
    assert sorted(china["subjects"]) == sorted(CMMLU_CHINA_SPECIFIC) and china["n"] == 75
    assert china["correct"] == sum(it.answer == "A" for n in CMMLU_CHINA_SPECIFIC for it in items[n])
    assert "| China-specific | 15 | 75 |" in render_markdown(report)


# ---- hand-made CMMLU fixtures ------------------------------------------------------------


GOOD = ["0", "中国的首都是", "北京", "上海", "广州", "深圳", "A"]


def test_cmmlu_fixture_skips_missing_subjects_with_a_log_line(tmp_path: Path, caplog) -> None:
    _write_csv(tmp_path / "test" / "chinese_history.csv",
               [GOOD, ["1", "多行\n问题", "a", "b", "c", "d", "B"], ["2", "q", "a", "b", "c", "d", "D"]])
    with caplog.at_level(logging.INFO, logger="steelworks.data.benchmarks"):
        subjects, items = load_benchmark(tmp_path, "test")
    assert [s.name for s in subjects] == ["chinese_history"] and subjects[0].china_specific
    assert "66 subject(s)" in caplog.text and "skipped" in caplog.text
    assert [(it.id, it.line) for it in items["chinese_history"]] == [("0", 2), ("1", 3), ("2", 5)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["1", "问题", "a", "b", "c", "d"], "expected 7 fields"),  # a missing column
        (["1", "问题", "a", "b", "c", "d", "E"], "answer 'E' is not one of"),
        (["1", "问题", "a", "b", "c", "d", "a"], "answer 'a' is not one of"),
        (["1", "问题", "a", "b", "c", "d", ""], "empty 'answer'"),  # test split has answers too
        (["1", "问题", "a", "", "c", "d", "A"], "missing option(s) B"),
        # Options keep their spaces (as lm-eval renders them), but spaces alone are no option.
        (["1", "问题", "a", " \t", "c", "\u3000", "A"], "missing option(s) B, D"),
        (["1", " ", "a", "b", "c", "d", "A"], "empty 'question'"),
        (["0", "问题", "a", "b", "c", "d", "A"], "duplicate id '0'"),
        (["", "问题", "a", "b", "c", "d", "A"], "empty 'id'"),
    ],
)
def test_cmmlu_malformed_row_names_file_and_line(tmp_path: Path, row, message) -> None:
    path = _write_csv(tmp_path / "test" / "anatomy.csv", [GOOD, row])
    with pytest.raises(BenchmarkFormatError) as err:
        load_cmmlu_layout(tmp_path, "test")
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_cmmlu_bad_header_unknown_subject_and_empty_split(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    with pytest.raises(FileNotFoundError, match="no '{subject}.csv' for any CMMLU subject"):
        load_cmmlu_layout(tmp_path, "dev")
    # C-Eval's header is not CMMLU's: refused, not misread.
    path = _write_csv(tmp_path / "dev" / "anatomy.csv", [GOOD + [""]], CEVAL_HEADER)
    with pytest.raises(BenchmarkFormatError, match=rf"{path}:1: bad header"):
        load_cmmlu_layout(tmp_path, "dev")
    path.unlink()
    _write_csv(tmp_path / "dev" / "astrology.csv", [GOOD])
    with pytest.raises(BenchmarkFormatError, match="not in the CMMLU map: astrology"):
        load_cmmlu_layout(tmp_path, "dev")


# ---- layout detection --------------------------------------------------------------------


def test_detect_layout_for_both_layouts(tmp_path: Path) -> None:
    ceval_row = ["0", "问题", "a", "b", "c", "d", "A", ""]
    # C-Eval with its mapping file.
    mapped = tmp_path / "mapped"
    mapped.mkdir()
    (mapped / "subject_mapping.json").write_text(
        json.dumps({"law": ["Law", "法学", "Social Science"]}), "utf-8")
    _write_csv(mapped / "law_val.csv", [ceval_row], CEVAL_HEADER)
    assert detect_layout(mapped) == "ceval"
    assert load_benchmark(mapped, "val") == load_ceval_layout(mapped, "val")

    # The official ceval-exam.zip: split folders, no mapping -> the packaged C-Eval map.
    zipped = tmp_path / "zipped"
    _write_csv(zipped / "dev" / "college_physics_dev.csv", [ceval_row], CEVAL_HEADER)
    assert detect_layout(zipped) == "ceval"  # a dev/ folder alone does not make it CMMLU
    subjects, items = load_benchmark(zipped, "dev")
    assert subjects == [Subject("college_physics", "College Physics", "大学物理", "STEM")]
    assert subjects[0].hard and len(items["college_physics"]) == 1
    _write_csv(zipped / "dev" / "astrology_dev.csv", [ceval_row], CEVAL_HEADER)
    with pytest.raises(BenchmarkFormatError, match="outside the C-Eval map: astrology_dev.csv"):
        load_benchmark(zipped, "dev")

    cmmlu = tmp_path / "cmmlu"
    _write_csv(cmmlu / "dev" / "anatomy.csv", [GOOD])
    assert detect_layout(cmmlu) == "cmmlu"
    assert [s.name for s in load_benchmark(cmmlu, "dev")[0]] == ["anatomy"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a C-Eval layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_benchmark(tmp_path / "nowhere", "dev")


def test_aggregate_hard_follows_the_flag_not_the_name() -> None:
    # Both benchmarks have a "high_school_physics": only C-Eval's counts as C-Eval Hard.
    cmmlu_hsp = next(s for s in cmmlu_subjects() if s.name == "high_school_physics")
    pred = {"subject": "high_school_physics", "id": "0", "answer": "A", "pred": "A",
            "scores": {}, "correct": True}
    assert "hard" not in aggregate([pred], [cmmlu_hsp])
    ceval_hsp = Subject("high_school_physics", "High School Physics", "高中物理", "STEM")
    report = aggregate([pred], [ceval_hsp])
    assert report["hard"]["n"] == 1 and "china_specific" not in report
