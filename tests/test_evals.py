"""The evals package: C-Eval-layout loading, prompt text, scoring, aggregation and reports."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from steelworks.data.benchmarks import (
    CEVAL_HARD_SUBJECTS,
    BenchmarkFormatError,
    Item,
    Subject,
    load_ceval_layout,
)
from steelworks.data.exam_prompt import build_prompt, format_question
from steelworks.evals import scoring
from steelworks.evals.config import EvalConfig
from steelworks.evals.prompts import chat_prompt, select_shots
from steelworks.evals.report import aggregate, write_report
from steelworks.evals.runner import evaluate_model_dir, load_items
from steelworks.evals.scoring import build_requests, predict, score_continuations

HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
MAPPING = {
    "college_physics": ["College Physics", "大学物理", "STEM"],
    "modern_chinese_history": ["Modern Chinese History", "近代史纲要", "Humanities"],
    "law": ["Law", "法学", "Social Science"],  # no CSVs: must be skipped, with a log line
}
VAL = {
    "college_physics": [
        ["0", "光速约为多少？", "3×10^8 m/s", "340 m/s", "1 m/s", "10 m/s", "A", ""],
        # A question spanning two lines: later records' line numbers must account for it.
        ["1", "下列哪个是矢量？\n（单选）", "质量", "速度", "温度", "时间", "B", ""],
        ["2", "牛顿第二定律是", "F=ma", "E=mc^2", "PV=nRT", "V=IR", "A", ""],
    ],
    "modern_chinese_history": [
        ["0", "鸦片战争爆发于哪一年？", "1840年", "1911年", "1949年", "1919年", "A", ""],
        ["1", "辛亥革命发生在哪一年？", "1840年", "1911年", "1949年", "1919年", "B", ""],
    ],
}
DEV = {
    "college_physics": [
        ["0", "力的单位是", "牛顿", "焦耳", "瓦特", "帕斯卡", "A", "力的单位是牛顿。"],
        ["1", "能量的单位是", "牛顿", "焦耳", "瓦特", "帕斯卡", "B", ""],
    ],
    "modern_chinese_history": [
        ["0", "五四运动发生在哪一年？", "1840年", "1911年", "1949年", "1919年", "D", ""],
        ["1", "新中国成立于哪一年？", "1840年", "1911年", "1949年", "1919年", "C", ""],
    ],
}


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def ceval_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ceval"
    root.mkdir()
    (root / "subject_mapping.json").write_text(json.dumps(MAPPING, ensure_ascii=False), "utf-8")
    for split, table in (("val", VAL), ("dev", DEV)):
        for subject, rows in table.items():
            _write_csv(root / f"{subject}_{split}.csv", rows)
    return root


def _item(question: str, answer: str | None, subject: str = "college_physics", id_: str = "0") -> Item:
    options = {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}
    return Item(subject, id_, question, options, answer, "", "x.csv", 2)


# ---- loading ------------------------------------------------------------------------------


def test_load_ceval_layout_reads_subjects_items_and_lines(ceval_dir: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="steelworks.data.benchmarks"):
        subjects, items = load_ceval_layout(ceval_dir, "val")
    assert subjects == [
        Subject("college_physics", "College Physics", "大学物理", "STEM"),
        Subject("modern_chinese_history", "Modern Chinese History", "近代史纲要", "Humanities"),
    ]
    assert "law" in caplog.text and "skipped" in caplog.text
    assert [len(items[s.name]) for s in subjects] == [3, 2]
    first, multiline, third = items["college_physics"]
    assert first.options == {"A": "3×10^8 m/s", "B": "340 m/s", "C": "1 m/s", "D": "10 m/s"}
    assert (first.id, first.answer, first.line) == ("0", "A", 2)
    assert multiline.question == "下列哪个是矢量？\n（单选）" and multiline.line == 3
    assert third.line == 5  # the record before it took lines 3 and 4
    assert third.source == str(ceval_dir / "college_physics_val.csv")
    _, dev = load_ceval_layout(ceval_dir, "dev")
    assert dev["college_physics"][0].explanation == "力的单位是牛顿。"


def test_load_ceval_layout_split_subdirectory_and_unanswered_test(tmp_path: Path) -> None:
    # The official ceval-exam.zip keeps each split in its own folder; test has no answers
    # and (like the official val files) the explanation column may be absent.
    (tmp_path / "subject_mapping.json").write_text(json.dumps(MAPPING), "utf-8")
    (tmp_path / "test").mkdir()
    _write_csv(tmp_path / "test" / "law_test.csv", [["7", "问题", "a", "b", "c", "d"]], HEADER[:6])
    subjects, items = load_ceval_layout(tmp_path, "test")
    assert [s.name for s in subjects] == ["law"]
    assert items["law"][0].answer is None and items["law"][0].explanation == ""


@pytest.mark.parametrize(
    ("row", "header", "message"),
    [
        (["1", "问题", "a", "b", "c", "", "A", ""], HEADER, "missing option(s) D"),
        (["1", "问题", "a", "b", "c", "d", "E", ""], HEADER, "answer 'E' is not one of"),
        (["1", "问题", "a", "b", "c", "d", "", ""], HEADER, "empty 'answer'"),
        (["1", "问题", "a", "b", "c"], HEADER, "expected 8 fields"),
        (["0", "问题", "a", "b", "c", "d", "A", ""], HEADER, "duplicate id '0'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, row, header, message) -> None:
    (tmp_path / "subject_mapping.json").write_text(json.dumps(MAPPING), "utf-8")
    good = ["0", "好问题", "a", "b", "c", "d", "A", ""]
    path = _write_csv(tmp_path / "law_val.csv", [good, row], header)
    with pytest.raises(BenchmarkFormatError) as err:
        load_ceval_layout(tmp_path, "val")
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_bad_header_and_empty_directory_are_errors(tmp_path: Path) -> None:
    (tmp_path / "subject_mapping.json").write_text(json.dumps(MAPPING), "utf-8")
    with pytest.raises(FileNotFoundError, match="no '{subject}_val.csv'"):
        load_ceval_layout(tmp_path, "val")
    # CMMLU's header is not C-Eval's: refused, not misread.
    path = _write_csv(tmp_path / "law_val.csv", [["0", "q", "a", "b", "c", "d", "A"]],
                      ["", "Question", "A", "B", "C", "D", "Answer"])
    with pytest.raises(BenchmarkFormatError, match=rf"{path}:1: bad header.*missing \['id', 'question'\]"):
        load_ceval_layout(tmp_path, "val")


def test_hard_subjects_constant() -> None:
    assert len(CEVAL_HARD_SUBJECTS) == 8 and "probability_and_statistics" in CEVAL_HARD_SUBJECTS


# ---- prompts ------------------------------------------------------------------------------


def test_zero_and_one_shot_prompt_text() -> None:
    item = _item("1+1=?", "B")
    shot = Item("college_physics", "9", "2+2=?", {"A": "4", "B": "5", "C": "6", "D": "7"}, "A", "",
                "x.csv", 3)
    zero = "以下是中国关于大学物理考试的单项选择题，请选出其中的正确答案。\n\n1+1=?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    assert build_prompt("大学物理", item, []) == zero
    one = (
        "以下是中国关于大学物理考试的单项选择题，请选出其中的正确答案。\n\n"
        "2+2=?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：A\n\n"
        "1+1=?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    )
    assert build_prompt("大学物理", item, [shot]) == one
    assert format_question(item, include_answer=True).endswith("答案：B\n\n")
    with pytest.raises(ValueError, match="x.csv:2"):
        format_question(_item("q", None), include_answer=True)


def test_chat_prompt_opens_the_assistant_turn(tiny_tokenizer_dir: Path) -> None:
    from steelworks.data.tokenizer import load_tokenizer

    text = chat_prompt(load_tokenizer(tiny_tokenizer_dir), "问题\n答案：")
    assert text == "<|im_start|>user\n问题\n答案：<|im_end|>\n<|im_start|>assistant\n"
    # The two variants of one item, character for character: the base-model prompt is the
    # documented exam text; the chat variant is that text as the user turn, answer turn open.
    base = build_prompt("大学物理", _item("1+1=?", "B"), [])
    assert base == ("以下是中国关于大学物理考试的单项选择题，请选出其中的正确答案。\n\n"
                    "1+1=?\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：")
    assert chat_prompt(load_tokenizer(tiny_tokenizer_dir), base) == (
        "<|im_start|>user\n" + base + "<|im_end|>\n<|im_start|>assistant\n")


def test_select_shots_never_uses_the_item_itself() -> None:
    pool = [_item("q0", "A", id_="0"), _item("q1", "B", id_="1"), _item("q2", "C", id_="2")]
    assert [s.id for s in select_shots(pool[0], pool, 2)] == ["1", "2"]
    assert [s.id for s in select_shots(_item("q", "A", id_="9"), pool, 2)] == ["0", "1"]
    with pytest.raises(ValueError, match="3 shots requested but only 2"):
        select_shots(pool[0], pool, 3)


# ---- scoring ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import load_model

    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def _reference_score(model, tok, context: str, continuation: str) -> float:
    """One unpadded forward over context ids + continuation ids, summed by hand."""
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_batched_scoring_equals_unbatched(tiny) -> None:
    model, tok = tiny
    contexts = ["北京是中国的首都。答案：", "The quick brown fox jumps over the lazy dog. 答案：", "你好"]
    continuations = [["A", "B", "上海是一座大城市"], ["world", "A"], ["世界！ Hello", "C"]]
    batched = score_continuations(model, tok, contexts, continuations, batch_size=8)
    single = [score_continuations(model, tok, [c], [k], batch_size=1)[0]
              for c, k in zip(contexts, continuations, strict=True)]
    reference = [[_reference_score(model, tok, c, x) for x in k] for c, k in zip(contexts, continuations, strict=True)]
    for b, s, r in zip(batched, single, reference, strict=True):
        assert b == pytest.approx(s, abs=1e-4)
        assert b == pytest.approx(r, abs=1e-4)
    # Multi-token continuations are genuinely scored (more negative than one token would be).
    assert batched[0][2] < min(batched[0][:2])


def test_over_long_context_is_left_truncated(tiny) -> None:
    model, tok = tiny
    context, continuation = "北京是中国的首都。上海是一座大城市。答案：", "上海是"
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    window = 6
    assert len(ctx) + len(cont) - 1 > window and len(cont) < window
    kept = (ctx + cont)[-(window + 1):]  # the model sees `window` tokens; the last is a target
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]])).logits[0].float(), -1)
    expected = sum(logprobs[window - len(cont) + j, t].item() for j, t in enumerate(cont))
    original = model.config.max_position_embeddings
    model.config.max_position_embeddings = window
    try:
        got = score_continuations(model, tok, [context], [[continuation]], batch_size=1)[0][0]
    finally:
        model.config.max_position_embeddings = original
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("scoring_mode", ["letter", "option_text"])
def test_shared_prefix_scores_as_whole_inputs(tiny, ceval_dir: Path, scoring_mode: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Contexts grouped by subject run their common prefix (chat template start, header, the
    shot) once and reuse its cache; the scores equal those of every input run whole, also
    for inputs of a group that were left-truncated (they run whole)."""
    model, tok = tiny
    cfg = EvalConfig(split="val", num_shots=1, chat=True, scoring=scoring_mode, batch_size=2)
    subjects, items, shots = load_items(ceval_dir, cfg)
    contexts, conts = build_requests(tok, items, subjects, cfg, shots)
    groups = [it.subject for it in items]
    suffix_batches = []
    real = scoring._suffix_batch
    monkeypatch.setattr(scoring, "_suffix_batch",
                        lambda *a: suffix_batches.append(len(a[2])) or real(*a))
    whole = score_continuations(model, tok, contexts, conts, 2)
    assert not suffix_batches  # no groups: nothing shared
    grouped = score_continuations(model, tok, contexts, conts, 2, groups=groups)
    assert suffix_batches and sum(suffix_batches) >= len(items)  # not vacuous: prefixes used
    assert grouped == [pytest.approx(row, abs=1e-4) for row in whole]
    # One context alone: its four inputs share the whole context (all of it in option_text
    # mode, where each option is a multi-token continuation scored from the context's end).
    one = score_continuations(model, tok, contexts[:1], conts[:1], 2, groups=groups[:1])
    assert one == [pytest.approx(whole[0], abs=1e-4)]

    # A window that cuts the longest inputs: those lose their prefix and run whole.
    lengths = sorted(len(tok.encode(c, add_special_tokens=False)) for c in contexts)
    original = model.config.max_position_embeddings
    model.config.max_position_embeddings = lengths[-1] - 1
    try:
        whole = score_continuations(model, tok, contexts, conts, 2)
        grouped = score_continuations(model, tok, contexts, conts, 2, groups=groups)
    finally:
        model.config.max_position_embeddings = original
    assert grouped == [pytest.approx(row, abs=1e-4) for row in whole]


def test_letter_predictions_are_argmax_and_option_text_is_normalised(tiny, ceval_dir: Path) -> None:
    model, tok = tiny
    subjects, by_subject = load_ceval_layout(ceval_dir, "val")
    items = [it for rows in by_subject.values() for it in rows]
    records = predict(model, tok, items, subjects, EvalConfig(scoring="letter", batch_size=2))
    assert [(r["subject"], r["id"]) for r in records] == [(it.subject, it.id) for it in items]
    for r, it in zip(records, items, strict=True):
        assert r["pred"] == max(r["scores"], key=r["scores"].get)
        assert r["correct"] == (r["pred"] == it.answer) and r["answer"] == it.answer

    cfg = EvalConfig(scoring="option_text", chat=False, batch_size=3)
    records = predict(model, tok, items[:1], subjects, cfg)
    prompt = build_prompt("大学物理", items[0], [])
    raw = score_continuations(model, tok, [prompt], [list(items[0].options.values())], 1)[0]
    expected = [s / len(text) for s, text in zip(raw, items[0].options.values(), strict=True)]
    assert list(records[0]["scores"].values()) == pytest.approx(expected, abs=1e-5)


# ---- aggregation and reports --------------------------------------------------------------


def _pred(subject: str, correct: bool | None) -> dict:
    return {"subject": subject, "id": "x", "answer": "A", "pred": "A" if correct else "B",
            "scores": {}, "correct": correct}


def test_aggregate_arithmetic() -> None:
    subjects = [Subject("modern_chinese_history", "MCH", "近代史纲要", "Humanities"),
                Subject("college_physics", "CP", "大学物理", "STEM"),
                Subject("high_school_physics", "HSP", "高中物理", "STEM")]
    preds = ([_pred("modern_chinese_history", c) for c in (True, False)]
             + [_pred("college_physics", c) for c in (True, True, True, False)]
             + [_pred("modern_chinese_history", None)])  # no gold answer: unscored
    report = aggregate(preds, subjects)
    assert report["subjects"]["modern_chinese_history"] == {
        "name_en": "MCH", "name_zh": "近代史纲要", "category": "Humanities",
        "n": 2, "correct": 1, "unscored": 1, "acc": 0.5}
    assert report["subjects"]["college_physics"]["acc"] == 0.75
    assert "high_school_physics" not in report["subjects"]  # no predictions: not evaluated
    assert (report["n"], report["correct"], report["unscored"]) == (6, 4, 1)
    assert report["micro_acc"] == pytest.approx(4 / 6)
    assert report["macro_acc"] == pytest.approx(0.625)
    assert report["categories"]["STEM"]["acc"] == 0.75
    assert report["categories"]["Humanities"]["acc"] == 0.5
    assert report["hard"]["subjects"] == ["college_physics"] and report["hard"]["acc"] == 0.75

    no_hard = aggregate(preds[:2], subjects[:1])
    assert "hard" not in no_hard
    with pytest.raises(ValueError, match="unknown subject 'law'"):
        aggregate([_pred("law", True)], subjects)


def test_write_report_files(tmp_path: Path) -> None:
    subjects = [Subject("college_physics", "CP", "大学物理", "STEM")]
    preds = [_pred("college_physics", True), _pred("college_physics", False)]
    paths = write_report(aggregate(preds, subjects), preds, tmp_path / "out")
    assert [Path(p).name for p in paths] == ["report.json", "report.md", "accuracy_by_category.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(Path(p).name for p in paths)
    data = json.loads(Path(paths[0]).read_text("utf-8"))
    assert data["summary"]["micro_acc"] == 0.5 and data["predictions"] == preds
    assert "| college_physics | 大学物理 | STEM | 2 | 1 | 50.00 |" in Path(paths[1]).read_text("utf-8")
    assert Path(paths[2]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_model_dir_end_to_end(tiny_model_dir: Path, ceval_dir: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(split="val", num_shots=1, scoring="letter", chat=True, batch_size=4, max_items=2)
    out = tmp_path / "eval"
    summary = evaluate_model_dir(tiny_model_dir, ceval_dir, cfg, out)
    assert summary["n"] == 4  # max_items=2 per subject, two subjects
    assert set(summary["subjects"]) == {"college_physics", "modern_chinese_history"}
    assert summary["meta"]["config"]["num_shots"] == 1
    assert summary["hard"]["n"] == 2
    data = json.loads((out / "report.json").read_text("utf-8"))
    assert data["summary"]["micro_acc"] == summary["micro_acc"]
    assert sum(p["correct"] for p in data["predictions"]) == summary["correct"]
    assert all(set(p["scores"]) == {"A", "B", "C", "D"} for p in data["predictions"])
    assert "近代史纲要" in (out / "report.md").read_text("utf-8")
    assert (out / "accuracy_by_category.png").stat().st_size > 1000
