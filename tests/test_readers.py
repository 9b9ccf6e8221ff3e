"""Input formats: every schema read into uniform rows, malformed input quarantined, not lost.

Pure-function tests on small fixtures of each exact schema (tests/fixtures/readers), the real
samples in ../shared when present, and one Ray test of ``read_source``.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from steelworks.data.config import SourceConfig
from steelworks.data.formats import (
    FORMATS,
    RecordError,
    expand_paths,
    format_kind,
    source_kind,
)
from steelworks.data.readers import ROW_COLUMNS, parse_file, read_source

FIXTURES = Path(__file__).parent / "fixtures" / "readers"


def parse(name: str, fmt: str, **kw: Any) -> list[dict[str, Any]]:
    path = FIXTURES / name
    rows = parse_file(str(path), path.read_bytes(), SourceConfig(name="src", path=str(path),
                                                                 format=fmt, **kw))
    for r in rows:  # every reader emits exactly the same columns and types
        assert tuple(r) == ROW_COLUMNS
        assert isinstance(r["line"], int)
        assert all(isinstance(r[c], str) for c in ROW_COLUMNS if c != "line")
        assert r["source"] == "src" and r["path"] == str(path)
    return rows


def kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert all(r["status"] == "kept" for r in rows), [r["reason"] for r in rows]
    return rows


def msgs(row: dict[str, Any]) -> list[dict[str, str]]:
    return json.loads(row["messages"])


def zstd_stream(data: bytes) -> bytes:
    """A zstd frame without a content size, as streaming compressors (zstd CLI on a pipe) write."""
    zstandard = pytest.importorskip("zstandard")
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_content_size=False).stream_writer(buf, closefd=False) as w:
        w.write(data)
    return buf.getvalue()


# ---- registry ----

def test_registry_kinds_and_unknown_format() -> None:
    assert {"jsonl", "json", "parquet", "skypile", "wanjuan_text", "wikipedia_cn", "baidu_baike",
            "baidu_qa", "starcoder", "alpaca", "belle", "firefly", "moss", "sharegpt",
            "infinity_instruct", "openai", "wanjuan_exam"} == set(FORMATS)
    assert format_kind("skypile") == "text" and format_kind("belle") == "sft"
    with pytest.raises(ValueError, match="unknown input format 'csv'.*skypile.*wanjuan_exam"):
        format_kind("csv")
    # A generic format is SFT when its source maps a messages column.
    assert source_kind(SourceConfig(name="a", path="x", format="jsonl")) == "text"
    assert source_kind(SourceConfig(name="a", path="x", format="parquet",
                                    columns={"messages": "dialog"})) == "sft"
    assert issubclass(RecordError, ValueError)


# ---- text schemas ----

@pytest.mark.parametrize("name, fmt, n, first", [
    ("skypile.jsonl", "skypile", 3, "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
    ("wanjuan_text.jsonl", "wanjuan_text", 2, "# 注意\n宿迁经开区第三批教师招聘笔试将于8月13日开考。"),
    ("wikipedia_cn.json", "wikipedia_cn", 2, "昭通机场是位于中国云南昭通的民用机场，始建于1935年。\n航点\n通航城市昆明。"),
])
def test_text_schemas(name: str, fmt: str, n: int, first: str) -> None:
    rows = kept(parse(name, fmt))
    assert [r["line"] for r in rows] == list(range(1, n + 1))
    assert rows[0]["text"] == first
    assert all(r["messages"] == r["task_type"] == r["lang"] == "" for r in rows)


def test_baidu_baike_renders_a_readable_document() -> None:
    rows = kept(parse("baidu_baike.jsonl", "baidu_baike"))
    assert rows[0]["text"] == (
        "红烧肉\n红烧肉是一道著名的大众菜肴，各大菜系都有自己特色的红烧肉。\n"
        "食材\n五花肉、冰糖、生抽、老抽、料酒。\n"
        "做法\n五花肉切块焯水。\n炒糖色后加入肉块翻炒，加水小火炖一小时。")
    assert rows[1]["text"] == "熊猫\n大熊猫是中国特有物种。"  # no sections


def test_baidu_qa_is_pretraining_text() -> None:
    rows = kept(parse("baidu_qa.jsonl", "baidu_qa"))
    assert rows[0]["text"] == ("人站在地球上为什么没有头朝下的感觉\n"
                               "地球上重力作用一直是指向球心的，因此只要头远离球心，人们就感觉头朝上。")
    assert rows[1]["text"].split("\n") == ["米饭怎么煮才好吃？", "每次煮的米饭都太硬了。",
                                           "米和水的比例大约是一比一点二，浸泡半小时再煮会更软糯。"]
    assert rows[1]["messages"] == ""


def test_parquet_starcoder_generic_and_corrupt(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "code.parquet"
    pq.write_table(pa.table({"content": ["def f():\n    return 1\n", None, "print('你好')\n"],
                             "id": [1, 2, 3]}), path)
    src = SourceConfig(name="code", path=str(path), format="starcoder")
    rows = parse_file(str(path), path.read_bytes(), src)
    assert [(r["line"], r["status"]) for r in rows] == [(1, "kept"), (2, "quarantined"),
                                                        (3, "kept")]
    assert rows[1]["reason"] == "row 2: field 'content' missing or not a string"
    assert json.loads(rows[1]["raw"]) == {"content": None, "id": 2}
    generic = SourceConfig(name="code", path=str(path), format="parquet",
                           columns={"text": "content"})
    assert [r["text"] for r in parse_file(str(path), path.read_bytes(), generic)] == \
        [r["text"] for r in rows]
    (bad := tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    [row] = parse_file(str(bad), bad.read_bytes(), src)
    assert row["status"] == "quarantined" and row["line"] == 0
    assert row["reason"].startswith("cannot read file:")


# ---- SFT schemas ----

def test_alpaca_and_belle() -> None:
    for name, fmt in [("alpaca.jsonl", "alpaca"), ("belle.jsonl", "belle")]:
        rows = kept(parse(name, fmt))
        assert {r["task_type"] for r in rows} == {"instruction"}
    rows = parse("alpaca.jsonl", "alpaca")
    assert msgs(rows[0]) == [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "1. Eat a balanced diet.\n2. Exercise regularly.\n"
                                         "3. Get enough sleep."}]
    assert msgs(rows[1])[0]["content"] == "把下面的句子翻译成英文。\n我爱北京天安门。"
    # SourceConfig.task_type overrides the format's tag.
    assert {r["task_type"] for r in parse("belle.jsonl", "belle", task_type="belle_zh")} == \
        {"belle_zh"}


def test_firefly_task_type_is_kind() -> None:
    rows = kept(parse("firefly.jsonl", "firefly"))
    assert [r["task_type"] for r in rows] == ["NLI", "Couplet"]
    assert msgs(rows[1]) == [{"role": "user", "content": "对联：春风送暖入屠苏"},
                             {"role": "assistant", "content": "爆竹声中一岁除"}]


def test_moss_003_chat_layout() -> None:
    rows = kept(parse("moss_003.jsonl", "moss"))
    first = msgs(rows[0])
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[0]["content"].startswith("You are an AI assistant whose name is MOSS.")
    assert first[1:3] == [{"role": "user", "content": "你好，请介绍一下你自己。"},
                          {"role": "assistant",
                           "content": "你好，我是MOSS，一个由复旦大学开发的对话语言模型。"}]
    # Plugin turns: inner thoughts, commands and tool results are dropped, markers stripped.
    assert msgs(rows[1])[1:] == [
        {"role": "user", "content": "一个三角形两边分别是3和4，夹角为直角，第三边是多少？"},
        {"role": "assistant", "content": "第三条边的长度是5。"}]
    assert {r["task_type"] for r in rows} == {"moss"}


def test_moss_plain_text_layout() -> None:
    rows = kept(parse("moss_002.jsonl", "moss"))
    assert msgs(rows[0]) == [
        {"role": "system", "content": "MOSS is an AI assistant developed by the FudanNLP Lab. "
                                      "Below is a conversation between MOSS and human."},
        {"role": "user", "content": "推荐一本入门的编程书。"},
        {"role": "assistant", "content": "可以读《Python编程：从入门到实践》。"},
        {"role": "user", "content": "为什么？"},
        {"role": "assistant", "content": "它讲解清晰，例子丰富。"}]
    # <|Human|>/<|MOSS|> markers with a leading meta instruction -> system message.
    second = msgs(rows[1])
    assert second[0]["role"] == "system" and "MOSS" in second[0]["content"]
    assert second[1:] == [{"role": "user", "content": "今天天气怎么样？"},
                          {"role": "assistant", "content": "抱歉，我无法获取实时天气信息。"}]


def test_moss_malformed(tmp_path: Path) -> None:
    path = tmp_path / "moss.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"plain_text": "[Human]: 你好<eoh> [MOSS]: 没有结束标记"},
        {"chat": {"turn_1": {"Human": "<|Human|>: 你好<eoh>\n"}}},
        {"id": 3},
    ]), encoding="utf-8")
    rows = parse_file(str(path), path.read_bytes(), SourceConfig(name="m", path="", format="moss"))
    assert [r["status"] for r in rows] == ["quarantined"] * 3
    assert "unterminated" in rows[0]["reason"]
    assert rows[1]["reason"] == "line 2: field 'chat.turn_1.MOSS' missing or not a string"
    assert "'chat' object" in rows[2]["reason"]


def test_sharegpt_and_infinity_instruct() -> None:
    rows = kept(parse("sharegpt.jsonl", "sharegpt"))
    assert [m["role"] for m in msgs(rows[0])] == ["system", "user", "assistant", "user",
                                                  "assistant"]
    assert {r["task_type"] for r in rows} == {"sharegpt"} and rows[0]["lang"] == ""
    rows = kept(parse("infinity_instruct.jsonl", "infinity_instruct"))
    assert [r["lang"] for r in rows] == ["zh-cn", "en"]
    assert {r["task_type"] for r in rows} == {"infinity_instruct"}
    assert msgs(rows[0])[0] == {"role": "user", "content": "用一句话解释光合作用。"}


def test_openai_messages_honour_record_task_type() -> None:
    rows = kept(parse("openai.jsonl", "openai"))
    assert [r["task_type"] for r in rows] == ["self_cognition", "chat"]
    assert msgs(rows[0])[0] == {"role": "system", "content": "你是Steel。"}


def test_sft_validation_quarantines_bad_conversations(tmp_path: Path) -> None:
    bad = [
        {"messages": []},
        {"messages": [{"role": "user", "content": "只有问题"}]},
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "  "}]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in bad), encoding="utf-8")
    rows = parse_file(str(path), path.read_bytes(),
                      SourceConfig(name="o", path="", format="openai"))
    assert [r["status"] for r in rows] == ["quarantined"] * 5
    reasons = [r["reason"] for r in rows]
    assert reasons[0] == "line 1: conversation is empty or not a list"
    assert reasons[1] == "line 2: conversation has no non-empty assistant turn"
    assert reasons[2] == "line 3: message 0: role 'bot' is not one of system, user, assistant"
    assert reasons[3] == "line 4: field 'messages[0].content' missing or not a string"
    assert reasons[4] == "line 5: conversation has no non-empty assistant turn"
    sharegpt = tmp_path / "sg.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "bing", "value": "x"}]}))
    [row] = parse_file(str(sharegpt), sharegpt.read_bytes(),
                       SourceConfig(name="s", path="", format="sharegpt"))
    assert row["reason"] == "line 1: conversations[0].from is 'bing', expected human, gpt or system"


def test_wanjuan_exam_styles() -> None:
    """Rendering is sft_builders.exam_to_messages; here: one row per style, same line."""
    rows = kept(parse("wanjuan_exam.jsonl", "wanjuan_exam"))  # exam_style defaults to both
    assert [(r["line"], r["task_type"]) for r in rows] == [
        (1, "exam_answer_first"), (1, "exam_cot"), (2, "exam_answer_first"), (2, "exam_cot")]
    assert all(msgs(r)[-1]["role"] == "assistant" for r in rows)
    assert "中国的首都是哪座城市" in "".join(m["content"] for m in msgs(rows[0]))
    single = kept(parse("wanjuan_exam.jsonl", "wanjuan_exam", exam_style="cot"))
    assert [(r["line"], r["task_type"]) for r in single] == [(1, "exam_cot"), (2, "exam_cot")]
    assert [r["messages"] for r in single] == [r["messages"] for r in rows[1::2]]


def test_wanjuan_exam_bad_items(tmp_path: Path) -> None:
    item = json.loads((FIXTURES / "wanjuan_exam.jsonl").read_text(encoding="utf-8").split("\n")[0])
    path = tmp_path / "exam.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {**item, "answer_detail": ""},  # no explanation: answer-first only, cot quarantined
        {**item, "std_ans": None},  # no answer: both styles quarantined
    ]), encoding="utf-8")
    rows = parse_file(str(path), path.read_bytes(),
                      SourceConfig(name="e", path="", format="wanjuan_exam"))
    assert [(r["line"], r["task_type"], r["status"]) for r in rows] == [
        (1, "exam_answer_first", "kept"), (1, "exam_cot", "quarantined"),
        (2, "exam_answer_first", "quarantined"), (2, "exam_cot", "quarantined")]
    assert all(r["reason"].startswith(f"line {r['line']}: ") and r["raw"]
               for r in rows if r["status"] == "quarantined")
    assert rows[1]["reason"].endswith("(cot style)")


# ---- generic formats and columns ----

def test_columns_mapping_for_custom_jsonl() -> None:
    rows = kept(parse("custom_text.jsonl", "jsonl", columns={"text": "body", "lang": "lang_tag"}))
    assert [(r["text"], r["lang"]) for r in rows] == [
        ("自定义语料的第一篇文档。", "zh"), ("Second document of a custom corpus.", "en")]
    [row] = kept(parse("custom_sft.jsonl", "jsonl",
                       columns={"messages": "dialog", "task_type": "kind"}))
    assert msgs(row) == [{"role": "user", "content": "一加一等于几？"},
                         {"role": "assistant", "content": "等于二。"}]
    assert row["task_type"] == "math" and row["text"] == ""
    # Without the mapping the default column `text` is missing: quarantined, not dropped.
    assert {r["reason"] for r in parse("custom_text.jsonl", "jsonl")} == {
        "line 1: field 'text' missing or not a string",
        "line 2: field 'text' missing or not a string"}


def test_json_array_files(tmp_path: Path) -> None:
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"text": "一"}, "not an object", {"text": "三"}]))
    src = SourceConfig(name="j", path="", format="json")
    rows = parse_file(str(good), good.read_bytes(), src)
    assert [(r["line"], r["status"]) for r in rows] == [(1, "kept"), (2, "quarantined"),
                                                        (3, "kept")]
    assert rows[1]["reason"] == "element 2: expected a JSON object, got str"
    assert rows[1]["raw"] == '"not an object"'
    for content, reason in [(b'[}', "not a valid JSON array file"),
                            (b'{"text": "x"}', "expected a JSON array of objects, got dict")]:
        (bad := tmp_path / "bad.json").write_bytes(content)
        [row] = parse_file(str(bad), content, src)
        assert (row["status"], row["line"]) == ("quarantined", 0) and reason in row["reason"]
    # Arrays are parsed as a stream: the elements before a cut stay, and the cut is one
    # quarantined line-0 row saying after which element the file broke.
    cut = b'[{"text": "x"}, {"text": "y"}, {"te'
    rows = parse_file("cut.json", cut, src)
    assert [(r["line"], r["status"], r["text"]) for r in rows] == [
        (1, "kept", "x"), (2, "kept", "y"), (0, "quarantined", "")]
    assert "not a valid JSON array file" in rows[2]["reason"] and "after element 2" in rows[2]["reason"]
    # A line-record schema shipped as one JSON array (Stanford's alpaca_data.json).
    arr = tmp_path / "alpaca_data.json"
    arr.write_text(json.dumps([{"instruction": "说你好", "input": "", "output": "你好"}] * 2,
                              ensure_ascii=False, indent=4), encoding="utf-8")
    rows = kept(parse_file(str(arr), arr.read_bytes(),
                           SourceConfig(name="a", path="", format="alpaca")))
    assert [r["line"] for r in rows] == [1, 2]


# ---- malformed input, encodings, compression ----

def test_malformed_lines_are_quarantined_with_line_and_reason() -> None:
    rows = parse("malformed.jsonl", "jsonl")
    assert [(r["line"], r["status"]) for r in rows] == [
        (1, "kept"), (2, "quarantined"), (4, "quarantined"), (5, "quarantined"), (6, "kept"),
        (7, "quarantined"), (8, "kept")]  # line 3 is blank: not a record
    by_line = {r["line"]: r for r in rows}
    assert by_line[2]["reason"] == "line 2: invalid JSON: Expecting ',' delimiter at column 26"
    assert by_line[2]["raw"] == '{"text": "missing comma" "oops": 1}'
    assert by_line[4]["reason"] == "line 4: field 'text' missing or not a string"
    assert by_line[5]["reason"] == "line 5: expected a JSON object, got list"
    assert by_line[7]["reason"].startswith("line 7: invalid UTF-8 at byte 19")
    assert [by_line[n]["text"] for n in (1, 6, 8)] == ["第一行是好的。", "第六行也是好的。",
                                                       "最后一行是好的。"]
    assert all(r["raw"] == "" and r["reason"] == "" for r in rows if r["status"] == "kept")


def test_raw_is_truncated_and_crlf_bom_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "好"}).encode() + b"\r\n"
                     + b'{"text": ' + b"9" * 5000 + b"}\r\n")
    rows = parse_file(str(path), path.read_bytes(), SourceConfig(name="x", path="", format="jsonl"))
    assert rows[0]["text"] == "好" and rows[0]["status"] == "kept"
    assert rows[1]["status"] == "quarantined" and len(rows[1]["raw"]) == 2000


def test_gzip_and_zstd(tmp_path: Path) -> None:
    plain = (FIXTURES / "skypile.jsonl").read_bytes()
    src = SourceConfig(name="src", path="", format="skypile")
    expected = [r["text"] for r in parse_file("a.jsonl", plain, src)]
    (gz := tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(plain))
    (zst := tmp_path / "a.jsonl.zst").write_bytes(zstd_stream(plain))
    # Two frames back to back (concatenated .zst files) read as one stream.
    (zst2 := tmp_path / "b.jsonl.zst").write_bytes(zstd_stream(plain[:40]) + zstd_stream(plain[40:]))
    for path in (gz, zst, zst2):
        rows = kept(parse_file(str(path), path.read_bytes(), src))
        assert [r["text"] for r in rows] == expected and rows[0]["path"] == str(path)


def test_corrupt_compressed_file_is_one_quarantined_row(tmp_path: Path) -> None:
    src = SourceConfig(name="src", path="", format="skypile")
    plain = (FIXTURES / "skypile.jsonl").read_bytes()
    cases = {"bad.jsonl.gz": b"this is not gzip",
             "cut.jsonl.gz": gzip.compress(plain)[:-20],
             "cut.jsonl.zst": zstd_stream(plain)[:-5],
             "bad.jsonl.zst": b"this is not zstd"}
    for name, data in cases.items():
        *before, row = parse_file(str(tmp_path / name), data, src)
        assert (row["status"], row["line"], row["raw"]) == ("quarantined", 0, ""), name
        assert row["reason"].startswith("cannot read file: " + name.rsplit(".", 1)[1][:4])
        # Files are decompressed as a stream: whole lines before the damage stay (never the
        # cut line itself), and the damage is the one line-0 row.
        expected = kept(parse_file("a.jsonl", plain, src))[:len(before)]
        assert kept(before) == [{**r, "path": str(tmp_path / name)} for r in expected], name
        assert name.startswith("cut") or not before, name


def test_expand_paths_directory_and_glob(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for rel in ["b.jsonl", "sub/a.jsonl.gz", "sub/c.jsonl.zst", "notes.txt", "sub/d.parquet",
                "sub/._b.jsonl", "[1].jsonl"]:
        (tmp_path / rel).write_bytes(b"")
    assert expand_paths(str(tmp_path), "skypile") == [
        str(tmp_path / "[1].jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "sub/a.jsonl.gz"),
        str(tmp_path / "sub/c.jsonl.zst")]
    assert expand_paths(str(tmp_path / "[1].jsonl"), "jsonl") == [str(tmp_path / "[1].jsonl")]
    assert expand_paths(str(tmp_path), "starcoder") == [str(tmp_path / "sub/d.parquet")]
    assert expand_paths(str(tmp_path / "**" / "?.jsonl*"), "jsonl") == [
        str(tmp_path / "b.jsonl"), str(tmp_path / "sub/a.jsonl.gz"),
        str(tmp_path / "sub/c.jsonl.zst")]
    assert expand_paths(str(tmp_path / "notes.txt"), "jsonl") == [str(tmp_path / "notes.txt")]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_paths(str(tmp_path / "nothing-here*.jsonl"), "jsonl")
    with pytest.raises(FileNotFoundError, match="reads .json files"):
        expand_paths(str(tmp_path / "sub"), "wikipedia_cn")
    with pytest.raises(ValueError, match="valid formats"):
        expand_paths(str(tmp_path), "csv")


# ---- the real samples in ../shared ----

@pytest.mark.parametrize("name, fmt, n", [
    ("skypile_zh_sample.jsonl", "skypile", 1000),
    ("wanjuan_nlp_zh_sample.jsonl", "wanjuan_text", 1000),
    ("wikipedia_cn_sample.json", "wikipedia_cn", 250),
    ("starcoder_python_sample.parquet", "starcoder", 500),
    ("belle_2m_cn_sample.jsonl", "belle", 1000),
    ("firefly_sample.jsonl", "firefly", 1000),
])
def test_real_samples(shared_dir: Path, name: str, fmt: str, n: int) -> None:
    path = shared_dir / "corpora" / name
    rows = kept(parse_file(str(path), path.read_bytes(),
                           SourceConfig(name="real", path=str(path), format=fmt)))
    assert [r["line"] for r in rows] == list(range(1, n + 1))
    if format_kind(fmt) == "text":
        assert all(r["text"].strip() for r in rows)
    else:
        assert all(r["task_type"] for r in rows)
        for r in rows:
            conv = msgs(r)
            assert [m["role"] for m in conv] == ["user", "assistant"]
            assert conv[0]["content"].strip() and conv[1]["content"].strip()


# ---- Ray ----

@pytest.mark.ray
def test_read_source_matches_parse_file(ray_local, tmp_path: Path) -> None:
    plain = (FIXTURES / "malformed.jsonl").read_bytes()
    (tmp_path / "a.jsonl").write_bytes(plain)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((FIXTURES / "skypile.jsonl").read_bytes()))
    (tmp_path / "c.jsonl.gz").write_bytes(b"corrupt: one quarantined row, the job goes on")
    src = SourceConfig(name="mixed", path=str(tmp_path), format="jsonl")
    expected = [row for f in expand_paths(src.path, src.format)
                for row in parse_file(f, Path(f).read_bytes(), src)]
    got = read_source(src).take_all()
    assert len(got) == 7 + 3 + 1
    key = lambda r: (r["path"], r["line"])  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)


# ---- streaming and splitting ----

def _messy_jsonl() -> bytes:
    """JSON lines with everything a cut can land on: a BOM, CRLF, blank lines, bad records,
    multi-byte characters and a line far longer than a block."""
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "第一行"}, ensure_ascii=False).encode()]
    for i in range(60):
        rec = {"text": f"文档{i} " + "长" * (i * 7 % 50)}
        lines.append(json.dumps(rec, ensure_ascii=False).encode())
        if i % 13 == 0:
            lines.append(b"")
        if i % 17 == 0:
            lines.append(b'{"text": broken')
        if i == 30:
            lines.append(json.dumps({"text": "巨" * 3000}, ensure_ascii=False).encode())
    return b"\r\n".join(lines[:30]) + b"\r\n" + b"\n".join(lines[30:]) + b"\n"


@pytest.mark.parametrize("block", [1, 7, 64, 333, 4096, 1 << 20])
def test_split_lines_read_the_same_rows_as_one_task(tmp_path: Path, block: int) -> None:
    from steelworks.data.readers import ReadCounts, plan_tasks, read_task

    data = _messy_jsonl()
    (path := tmp_path / "a.jsonl").write_bytes(data)
    src = SourceConfig(name="s", path=str(path), format="jsonl")
    whole = parse_file(str(path), data, src)
    tasks = plan_tasks(src, block)
    assert len(tasks) == max(1, -(-len(data) // block)) if block < len(data) else len(tasks) == 1
    counts, rows = ReadCounts(), []
    for t in tasks:
        rows += [r for batch in read_task(t, src, counts=counts, batch_rows=5) for r in batch]
    assert rows == whole  # same rows, same line numbers, same order, none twice
    assert counts.records == counts.rows == len(whole)
    bad = [r["line"] for r in rows if r["status"] == "quarantined"]
    assert len(bad) == 4 and all(data.split(b"\n")[n - 1].startswith(b'{"text": broken') for n in bad)


def test_split_parquet_by_row_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steelworks.data.readers import plan_tasks, read_task

    texts = [f"行{i}" * 20 for i in range(100)] + [None]  # the last one: quarantined
    pq.write_table(pa.table({"content": texts}), path := tmp_path / "a.parquet", row_group_size=10)
    src = SourceConfig(name="s", path=str(path), format="starcoder")
    whole = parse_file(str(path), path.read_bytes(), src)
    tasks = plan_tasks(src, 300)
    assert len(tasks) > 3 and {t.mode for t in tasks} == {"parquet"}
    rows = [r for t in tasks for batch in read_task(t, src) for r in batch]
    assert rows == whole and [r["line"] for r in rows] == list(range(1, 102))
    assert rows[-1]["status"] == "quarantined" and rows[-1]["reason"].startswith("row 101: ")


@pytest.mark.parametrize("suffix", [".zst", ".gz", ""])
def test_files_are_read_as_a_stream(tmp_path: Path, suffix: str) -> None:
    """The first rows come out before the file is read through: memory per task does not
    grow with the file (benchmarks/data_pipeline.py measures it on GB inputs)."""
    import random

    from steelworks.data.readers import ReadTask, read_task

    # Random hex: text that compresses about 2:1, as real text does, not 300:1.
    rng = random.Random(0)
    body = b"".join(json.dumps({"text": f"第{i}篇 " + rng.randbytes(150).hex()}).encode() + b"\n"
                    for i in range(40_000))  # ~13 MB
    data = zstd_stream(body) if suffix == ".zst" else gzip.compress(body) if suffix == ".gz" else body
    (path := tmp_path / f"big.jsonl{suffix}").write_bytes(data)
    src = SourceConfig(name="s", path=str(path), format="jsonl")
    with open(path, "rb") as f:
        batches = read_task(ReadTask(str(path), str(path)), src, f, batch_rows=100)
        first = next(batches)
        assert len(first) == 100 and first[0]["text"].startswith("第0篇")
        assert f.tell() < len(data) / 4  # read a few chunks, not the file
        assert sum(len(b) for b in batches) == 40_000 - 100


def test_json_array_is_streamed(tmp_path: Path) -> None:
    from steelworks.data.readers import ReadTask, read_task

    items = [{"completion": f"条目{i} " + "文" * 300} for i in range(10_000)]
    data = json.dumps(items, ensure_ascii=False, indent=2).encode()  # ~10 MB
    (path := tmp_path / "wiki.json").write_bytes(data)
    src = SourceConfig(name="w", path=str(path), format="wikipedia_cn")
    with open(path, "rb") as f:
        batches = read_task(ReadTask(str(path), str(path)), src, f, batch_rows=50)
        assert [r["line"] for r in next(batches)] == list(range(1, 51))
        assert f.tell() < len(data) / 4


# ---- column templates (custom data) ----

def test_column_templates_join_columns_into_a_document_or_a_conversation(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The Zhihu layout: one prompt/response pair per row.
    pq.write_table(pa.table({"INSTRUCTION": ["什么是熵？", "为什么天是蓝的？", None],
                             "RESPONSE": ["熵是无序程度的度量。", "因为瑞利散射。", "没有问题"],
                             "SOURCE": ["zhihu", "zhihu", "zhihu"], "votes": [3, 10, 1]}),
                   path := tmp_path / "zhihu.parquet")
    doc = SourceConfig(name="z", path=str(path), format="parquet",
                       columns={"text": "{INSTRUCTION}\n{RESPONSE}（{votes}赞）"})
    rows = parse_file(str(path), path.read_bytes(), doc)
    assert source_kind(doc) == "text"
    assert [r["text"] for r in rows[:2]] == ["什么是熵？\n熵是无序程度的度量。（3赞）",
                                             "为什么天是蓝的？\n因为瑞利散射。（10赞）"]
    assert rows[2]["status"] == "quarantined"
    assert rows[2]["reason"] == "row 3: field 'INSTRUCTION' (in the text template) missing or not a string"

    sft = SourceConfig(name="z", path=str(path), format="parquet",
                       columns={"prompt": "INSTRUCTION", "response": "RESPONSE",
                                "system": "来自{SOURCE}的问答"})
    assert source_kind(sft) == "sft"
    rows = parse_file(str(path), path.read_bytes(), sft)
    assert msgs(rows[0]) == [{"role": "system", "content": "来自zhihu的问答"},
                             {"role": "user", "content": "什么是熵？"},
                             {"role": "assistant", "content": "熵是无序程度的度量。"}]
    assert rows[0]["task_type"] == "chat" and rows[2]["status"] == "quarantined"
    # Without a system mapping there is no system turn.
    plain = SourceConfig(name="z", path=str(path), format="parquet",
                         columns={"prompt": "INSTRUCTION", "response": "RESPONSE"})
    assert [m["role"] for m in msgs(parse_file(str(path), path.read_bytes(), plain)[1])] == [
        "user", "assistant"]


@pytest.mark.parametrize("columns, message", [
    ({"prompt": "q"}, "needs both prompt and response"),
    ({"text": "t", "prompt": "q", "response": "a"}, "maps one of text, messages or prompt"),
    ({"system": "s", "text": "t"}, "columns.system goes with prompt/response"),
    ({"body": "t"}, "unknown columns keys ['body']"),
])
def test_column_mapping_errors(columns: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SourceConfig(name="bad", path="x", format="jsonl", columns=columns)


@pytest.mark.ray
def test_split_source_on_ray_and_accounting_that_can_fail(ray_local, tmp_path: Path) -> None:
    """A file cut into many tasks reads the same rows as one task; the readers count their
    records on the side, so a row lost downstream fails the accounting check, naming the
    source."""
    from ray.data.expressions import col

    from steelworks.data.clean import (
        add_read_counts,
        check_accounting,
        count_statuses,
        data_context,
    )
    from steelworks.data.readers import plan_tasks

    data_context()  # the data jobs' settings: rows in task order (preserve_order), as run_clean

    data = _messy_jsonl()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(data)
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(zstd_stream(data))
    src = SourceConfig(name="messy", path=str(tmp_path / "in"), format="jsonl")
    assert len(plan_tasks(src, 500)) > 5
    expected = [row for f in expand_paths(src.path, src.format)
                for row in parse_file(f, Path(f).read_bytes(), src)]
    ds = read_source(src, block_bytes=500, counts_dir=str(tmp_path / "counts")).materialize()
    assert ds.take_all() == expected  # in order: split tasks in file order

    counts = count_statuses(ds)
    add_read_counts(counts, tmp_path / "counts")
    assert counts["messy"]["read"] == len(expected)
    check_accounting(counts)  # adds up

    lossy = count_statuses(ds.filter(expr=col("line") != 7))  # a step that drops one row
    add_read_counts(lossy, tmp_path / "counts")
    with pytest.raises(RuntimeError, match=r"source 'messy'.* 2 lost on the way"):
        check_accounting(lossy)
