"""Decontamination against C-Eval / CMMLU: n-gram extraction, planted overlaps, no false
positives on real text, and the data stage on Ray with the step on (drop)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from steelworks.core.config import ConfigError, load
from steelworks.data.config import DataConfig, DecontamConfig, SourceConfig
from steelworks.data.decontam import (
    CONTAMINATED,
    NgramIndex,
    load_items,
    mark_contaminated,
    ngram_hashes,
    ngrams,
    summarize,
    tokenize,
)
from steelworks.platform.settings import PipelineConfig

# A 12-character question: too short on its own, found with its options.
SHORT_Q = ["0", "著名民乐作品《十面埋伏》属于", "管乐", "打击乐", "弹拨乐", "弦乐", "C"]
LONG_Q = ["1", "中国古代四大名著中，描写一百零八位好汉聚义梁山泊故事的小说是哪一部作品？",
          "三国演义", "水浒传", "西游记", "红楼梦", "B"]
TEST_Q = ["0", "在我国传统节日中，农历五月初五人们通常会吃粽子并举行龙舟比赛，这个节日是",
          "春节", "端午节", "中秋节", "重阳节", "B"]
EN_Q = ("Which of the following statements about the worst case time complexity of binary "
        "search on a sorted array of n elements is correct")


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_cmmlu(root: Path) -> Path:
    """A CMMLU layout: dev and test splits of the ``arts`` subject."""
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    _write(root / "dev" / "arts.csv", header, [SHORT_Q, LONG_Q])
    _write(root / "test" / "arts.csv", header, [TEST_Q])
    return root


def make_ceval(root: Path) -> Path:
    """A C-Eval layout (no subject_mapping.json: the packaged map) with one val item."""
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _write(root / "val" / "computer_network_val.csv", header,
           [["7", EN_Q, "O(n)", "O(log n)", "O(1)", "O(n log n)", "B", ""]])
    return root


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("bench")
    return [make_cmmlu(root / "cmmlu"), make_ceval(root / "ceval")]


@pytest.fixture(scope="module")
def index(bench_dirs) -> NgramIndex:
    return NgramIndex.build(load_items([str(d) for d in bench_dirs]), ngram=13)


# ----------------------------------------------------------------------------- n-grams


def test_tokens_are_cjk_characters_and_words() -> None:
    assert tokenize("北京，Hello  World！2024年") == ["北", "京", "hello", "world", "2024", "年"]
    # NFKC: full-width letters and digits are ASCII; case folded; punctuation splits words.
    assert tokenize("ＡＢＣ１２３ don't") == ["abc123", "don", "t"]
    assert tokenize("。，！？ ... \n\t") == []


def test_cjk_character_ngrams() -> None:
    assert ngrams("一二三四五", 3) == ["一二三", "二三四", "三四五"]
    # Punctuation and whitespace are not characters of the n-gram.
    assert ngrams("一二，三 四。五", 3) == ["一二三", "二三四", "三四五"]


def test_word_ngrams_and_mixed_text() -> None:
    assert ngrams("The cat sat on the mat.", 3) == ["the cat sat", "cat sat on", "sat on the",
                                                    "on the mat"]
    assert ngrams("我爱 Python 编程", 3) == ["我爱 python", "爱 python 编", "python 编程"]


def test_normalization_hides_no_overlap() -> None:
    a = ngram_hashes("中国古代四大名著中，描写一百零八位好汉聚义梁山泊故事的小说是哪一部作品？", 13)
    b = ngram_hashes("中国古代四大名著中, 描写一百零八位 好汉聚义梁山泊故事的小说是哪一部作品?", 13)
    assert a.dtype == np.uint64 and len(a) == 34 - 13 + 1  # 34 characters, punctuation aside
    assert np.array_equal(a, b)
    en = ngram_hashes(EN_Q, 13)
    assert np.array_equal(en, ngram_hashes(EN_Q.upper().replace(" ", "  \n"), 13))


def test_hashes_follow_the_ngrams() -> None:
    text = "一二三一二三 the cat the cat"
    grams, hashes = ngrams(text, 3), ngram_hashes(text, 3)
    assert len(grams) == len(hashes)
    for i in range(len(grams)):
        for j in range(len(grams)):
            assert (grams[i] == grams[j]) == (hashes[i] == hashes[j]), (grams[i], grams[j])
    assert len(ngram_hashes("一二", 3)) == 0 and ngrams("一二", 3) == []


def test_documents_with_very_many_distinct_words_hash_the_same(monkeypatch) -> None:
    """Past the private-use characters that stand for words, a document is tokenized token
    by token: the same n-grams, the same hashes."""
    import steelworks.data.decontam as dc

    text = "北京 " + " ".join(f"w{i}" for i in range(50)) + " 上海，Hello"
    fast, grams = ngram_hashes(text, 4), ngrams(text, 4)
    monkeypatch.setattr(dc, "_PUA_N", 10)
    assert dc._token_string(text) is None  # the slow path is taken
    assert np.array_equal(ngram_hashes(text, 4), fast) and ngrams(text, 4) == grams


# ----------------------------------------------------------------------------- benchmarks


def test_items_come_from_every_split_of_both_layouts(bench_dirs) -> None:
    items = load_items([str(d) for d in bench_dirs])
    got = [(i.benchmark, i.split, i.subject, i.id) for i in items]
    assert got == [("cmmlu", "dev", "arts", "0"), ("cmmlu", "dev", "arts", "1"),
                   ("cmmlu", "test", "arts", "0"), ("ceval", "val", "computer_network", "7")]
    only_test = load_items([str(bench_dirs[0])], splits=["test"])
    assert [(i.split, i.id) for i in only_test] == [("test", "0")]


def test_index_counts_items_too_short_to_check(tmp_path) -> None:
    cmmlu = tmp_path / "cmmlu"
    _write(cmmlu / "dev" / "arts.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
           [["0", "审美的客体是", "艺术受众", "艺术作品", "鉴赏者", "艺术家", "B"],
            ["1", "一加一", "一", "二", "三", "四", "B"]])
    index = NgramIndex.build(load_items([str(cmmlu)]), ngram=13)
    # Item 0 has 20 characters with its options; item 1 has 7: nothing to match on.
    st = index.stats["cmmlu"]
    assert (st["splits"], st["items"], st["too_short"]) == (["dev"], 2, 1) and st["ngrams"] > 0


def test_planted_question_is_found_verbatim(index) -> None:
    doc = f"今天复习语文。{LONG_Q[1]}答案是水浒传。明天继续。"
    hits = index.match(doc)
    assert [(h["benchmark"], h["split"], h["subject"], h["id"]) for h in hits] == [
        ("cmmlu", "dev", "arts", "1")]
    assert hits[0]["ngram"] in "中国古代四大名著中描写一百零八位好汉聚义梁山泊故事的小说是哪一部作品"
    assert len(hits[0]["ngram"]) == 13


def test_planted_question_with_changed_punctuation_and_spacing(index) -> None:
    doc = ("题目：中国古代四大名著中 ,描写一百零八位好汉\n聚义梁山泊故事的小说是 哪一部作品 ?\n"
           "A.三国演义 B.水浒传")
    assert [h["id"] for h in index.match(doc)] == ["1"]
    assert [h["benchmark"] for h in index.match("在我国传统节日中 农历五月初五 人们通常会吃粽子。")] \
        == ["cmmlu"]


def test_short_question_is_found_with_its_options(index) -> None:
    doc = "著名民乐作品《十面埋伏》属于（  ）\nA. 管乐  B. 打击乐  C. 弹拨乐  D. 弦乐\n答案：C"
    assert [(h["split"], h["id"]) for h in index.match(doc)] == [("dev", "0")]
    unlettered = "著名民乐作品《十面埋伏》属于：管乐、打击乐、弹拨乐还是弦乐？"
    assert [h["id"] for h in index.match(unlettered)] == ["0"]
    # The question alone is 12 characters: below the n-gram size, it cannot decide.
    assert index.match("著名民乐作品《十面埋伏》属于弹拨乐。") == []


def test_options_alone_are_not_a_match(index) -> None:
    # LONG_Q's four options are 13 characters together: a list of the four classics is not
    # the question.
    assert index.match("中国四大名著：三国演义、水浒传、西游记、红楼梦。") == []
    assert index.match("A. 三国演义 B. 水浒传 C. 西游记 D. 红楼梦") == []


def test_english_question_is_found_as_word_ngrams(index) -> None:
    doc = f"Exam prep, day 3.\n\n{EN_Q.upper()}?  (B) O(log n)"
    hits = index.match(doc)
    assert [(h["benchmark"], h["subject"], h["id"]) for h in hits] == [
        ("ceval", "computer_network", "7")]
    assert len(hits[0]["ngram"].split()) == 13


def test_unrelated_text_is_untouched(index) -> None:
    from conftest import TINY_TEXTS

    for text in TINY_TEXTS + ["中国古代四大名著是三国演义、水浒传、西游记和红楼梦。",
                              "Binary search runs in logarithmic time on a sorted array."]:
        assert index.match(text) == [], text


def _rows(texts: list[str], statuses: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"source": "web", "path": "/c/web.jsonl", "line": range(1, len(texts) + 1),
                         "status": statuses, "text": texts})


@pytest.mark.parametrize("action", ["drop", "flag"])
def test_mark_contaminated_drops_or_flags_kept_rows(index, action) -> None:
    planted = f"笔记：{LONG_Q[1]}"
    batch = _rows([planted, "北京是中国的首都，也是一座历史悠久的城市。", planted],
                  ["kept", "kept", "filtered:text_length"])
    out = mark_contaminated(batch, index, action=action, kind="text")
    assert list(out["status"]) == [CONTAMINATED if action == "drop" else "kept", "kept",
                                   "filtered:text_length"]  # only kept rows are checked
    assert out["contam"][1] == out["contam"][2] == ""
    hit = json.loads(out["contam"][0])
    assert [(h["benchmark"], h["id"]) for h in hit] == [("cmmlu", "1")]


def test_sft_rows_are_checked_on_their_message_contents(index) -> None:
    msgs = [{"role": "user", "content": f"请回答：{EN_Q}?"},
            {"role": "assistant", "content": "O(log n)"}]
    other = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    batch = pd.DataFrame({"source": "chat", "path": "/c/sft.jsonl", "line": [1, 2],
                          "status": "kept", "text": "",
                          "messages": [json.dumps(m, ensure_ascii=False) for m in (msgs, other)]})
    out = mark_contaminated(batch, index, action="drop", kind="sft")
    assert list(out["status"]) == [CONTAMINATED, "kept"]


def test_summary_counts_per_benchmark_and_keeps_a_few_examples(index) -> None:
    texts = [f"第{i}题。{LONG_Q[1]}" for i in range(4)] + [f"{EN_Q} {TEST_Q[1]}", "无关的句子。"]
    out = mark_contaminated(_rows(texts, ["kept"] * 6), index, action="flag", kind="text")
    rows = out[out["contam"] != ""][["source", "path", "line", "contam"]].to_dict("records")
    s = summarize(index, rows[::-1], examples=2, action="flag")
    assert s["action"] == "flag" and s["docs"] == 5
    assert s["benchmarks"]["cmmlu"]["docs"] == 5 and s["benchmarks"]["ceval"]["docs"] == 1
    assert s["by_source"] == {"web": 5}
    ex = s["benchmarks"]["cmmlu"]["examples"]
    assert [e["line"] for e in ex] == [1, 2]  # the first by (path, line), whatever the order
    assert set(ex[0]) == {"source", "path", "line", "split", "subject", "id", "ngram"}
    assert s["benchmarks"]["ceval"]["examples"][0]["id"] == "7"
    assert s["benchmarks"]["cmmlu"]["items"] == 3 and s["benchmarks"]["cmmlu"]["too_short"] == 0


# ----------------------------------------------------------------------------- config


def test_config_is_typed_and_validated(tmp_path) -> None:
    cfg = load(PipelineConfig, None, ["data.decontam.enabled=true",
                                      f"data.decontam.benchmarks=[{tmp_path / 'cmmlu'}]",
                                      "data.decontam.action=flag"])
    assert isinstance(cfg.data.decontam, DecontamConfig) and cfg.data.decontam.ngram == 13
    assert DataConfig().decontam.enabled is False
    with pytest.raises(ConfigError, match="drop"):
        load(PipelineConfig, None, ["data.decontam.action=delete"])
    with pytest.raises(ValueError, match="benchmarks"):
        DecontamConfig(enabled=True)
    with pytest.raises(ValueError, match="ngram"):
        DecontamConfig(ngram=0)
    with pytest.raises(ValueError, match="names"):
        DecontamConfig(benchmarks=["a/cmmlu", "b/cmmlu"])


# ----------------------------------------------------------------------------- real data


def test_real_corpus_against_real_cmmlu_dev(shared_dir) -> None:
    """No false positives on 200 real SkyPile documents against the real CMMLU dev split;
    any hit must be a genuine shared 13-gram (both texts contain it), not a hash artifact."""
    from conftest import cmmlu_dir

    from steelworks.data.decontam import token_text

    items = load_items([str(cmmlu_dir(shared_dir))], splits=["dev"])
    index = NgramIndex.build(items, ngram=13)
    by_key = {(i.split, i.subject, i.id): i for i in items}
    lines = (shared_dir / "corpora" / "skypile_zh_sample.jsonl").read_text("utf-8").splitlines()
    docs = [json.loads(x)["text"] for x in lines[:200]]
    hits = [(n, h) for n, d in enumerate(docs) for h in index.match(d)]
    print(f"\nCMMLU dev: {len(items)} items, {index.stats['cmmlu']}; "
          f"{len(hits)} hit(s) in {len(docs)} SkyPile docs")
    for n, h in hits:
        item = by_key[(h["split"], h["subject"], h["id"])]
        print(f"  doc {n}: {h['subject']}#{h['id']} {h['ngram']!r} | {item.question[:60]!r}")
        assert h["ngram"] in token_text(docs[n])
        assert h["ngram"] in token_text(" ".join([item.question, *item.options.values()])) \
            or h["ngram"] in token_text(
                " ".join([item.question, *(f"{k}. {v}" for k, v in item.options.items())]))
    assert len({n for n, _ in hits}) <= 2  # 0 when written: 13 characters are specific


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def stage(tmp_path_factory, ray_local, bench_dirs):
    from steelworks.platform.pipeline import run_data

    root = tmp_path_factory.mktemp("decontam_stage")
    docs = [f"第{i}篇。{c}是一座历史悠久的城市，每年有{100 + i}万游客来参观博物馆和公园。"
            for i, c in enumerate(["北京", "上海", "广州", "成都", "杭州", "西安"])]
    docs.insert(3, f"期末复习资料：{LONG_Q[1]}（答案：水浒传）")
    web = root / "web.jsonl"
    web.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                   encoding="utf-8")
    chats = [[{"role": "user", "content": f"{c}在哪里？"}, {"role": "assistant", "content": f"{c}在中国。"}]
             for c in ("北京", "上海")]
    chats.append([{"role": "user", "content": EN_Q + "? A. O(n) B. O(log n)"},
                  {"role": "assistant", "content": "B"}])
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats),
                   encoding="utf-8")
    data = DataConfig(source="files", sources=[SourceConfig(name="web", path=str(web))],
                      sft_sources=[SourceConfig(name="chat", path=str(sft), format="openai")],
                      decontam=DecontamConfig(enabled=True, benchmarks=[str(d) for d in bench_dirs],
                                              action="drop", examples=5))
    cfg = PipelineConfig(run="decontam", runs_dir=str(root / "runs"), stages=["data"], data=data)
    return run_data(cfg), root / "runs" / "decontam" / "data"


@pytest.mark.ray
def test_data_stage_drops_contaminated_documents(stage, bench_dirs) -> None:
    manifest, out = stage
    counts = manifest["metrics"]["counts"]
    assert counts["web"] == {"read": 7, "kept": 6, CONTAMINATED: 1}
    assert counts["chat"] == {"read": 3, "kept": 2, CONTAMINATED: 1}
    d = manifest["metrics"]["decontam"]
    assert d["action"] == "drop" and d["docs"] == 2 and d["by_source"] == {"web": 1, "chat": 1}
    assert d["benchmarks"]["cmmlu"]["docs"] == 1 and d["benchmarks"]["ceval"]["docs"] == 1
    [ex] = d["benchmarks"]["cmmlu"]["examples"]
    assert (ex["source"], Path(ex["path"]).name, ex["line"], ex["subject"], ex["id"]) == (
        "web", "web.jsonl", 4, "arts", "1")
    assert len(ex["ngram"]) == 13
    # Dropped: not in the cleaned text nor the SFT set, but listed with the reason.
    clean = pd.concat(pd.read_parquet(f) for f in sorted((out / "clean").glob("*.parquet")))
    assert len(clean) == 6 and not clean["text"].str.contains("梁山泊").any()
    sft = pd.concat(pd.read_parquet(f) for f in sorted((out / "sft").glob("*.parquet")))
    assert list(sft["line"]) == [1, 2]
    listed = [json.loads(x) for x in (out / "decontam.jsonl").read_text("utf-8").splitlines()]
    assert [(r["source"], r["line"]) for r in listed] == [("chat", 3), ("web", 4)]
    assert "decontam.jsonl" in manifest["outputs"]
    # The benchmark directories are among what the stage read (its cache key covers them).
    assert all(any(str(d) in k for k in manifest["reads"]) for d in bench_dirs), manifest["reads"]
