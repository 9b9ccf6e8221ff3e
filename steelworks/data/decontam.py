"""Benchmark decontamination: training documents that share an n-gram with a C-Eval / CMMLU
item are dropped (status ``contaminated``) or flagged.

Tokens. Text is normalized (NFKC, which also maps full-width letters, digits and
punctuation to ASCII, then case-folded) and cut into tokens: every CJK character (Han, kana,
hangul; ``steelworks.data.filters.CJK``) is one token, and every run of other letters and
digits is one word token; whitespace and punctuation are dropped, so they only separate
words. One rule covers all text: Chinese gets character n-grams, space-separated text word
n-grams, and mixed text (``用 Python 编程``) a sequence of both, the same way on both sides.
This is the statistics' notion of a word (``filters.words_of``), except that an apostrophe
splits a word here (``don't`` -> ``don t``): quotes vary between ' and ’ in the wild.
The default n of 13 follows GPT-3's decontamination (Brown et al. 2020, appendix C); for
Chinese, 13 characters are about a clause. Measured on the 4,250 documents of
../shared/corpora against the CMMLU dev split (335 questions): no hit at 13; at 8, six hits,
all common phrases (``第二次世界大战后``, ``向人民法院提起诉``), not leaked questions.

Benchmark side. For each item, the question joined with its options, once plain and once
with the option letters (``A. 管乐 B. ...``, the way exam pages print them); only n-grams
that start inside the question count. So a document holding the question (13 tokens of
it or more) is caught, a short question is caught together with the start of its options,
and options alone (``三国演义 水浒传 西游记 红楼梦``: four titles any text may list) are not.
Items whose question and options are shorter than n tokens in total yield no n-gram: the
manifest counts them as ``too_short`` (unchecked).

Rows. Only rows still ``kept`` are checked (a duplicate of a contaminated document stays
a duplicate: one bucket per record); SFT rows on their message contents joined. ``drop``
moves a matched row to ``contaminated``, ``flag`` leaves it kept; either way it is listed in
``decontam.jsonl`` and counted in the manifest.

Hashing. A token's code is its code point (CJK) or its xxh64 with the top bit set (words),
mixed by splitmix64; an n-gram's hash is a polynomial over its tokens' mixed codes mod
2**64, mixed once more. Everything is vectorized in numpy except the regex pass and one
xxh64 per distinct word of a document (about 1M characters/s on one core). The benchmark
side is a sorted ``uint64`` array (CMMLU dev: 27 n-grams per question, so its ~12k test
questions give ~3*10^5 keys, 2.5 MB): the driver builds it once and puts it in the object
store, each batch looks its documents' hashes up with ``np.searchsorted``.
Collisions between distinct n-grams are possible in principle (about n_doc * n_bench /
2**64 per document: none expected at corpus scale); every reported hit shows its n-gram text
taken from the document, so one would be visible.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xxhash

from steelworks.data.config import DecontamConfig
from steelworks.data.filters import CJK

KEPT, CONTAMINATED = "kept", "contaminated"
COLUMN = "contam"  # per row: JSON list of hits, one per matched benchmark; "" when none
SPLITS = {"cmmlu": ("dev", "test"), "ceval": ("dev", "val", "test")}  # the layouts' splits

_WORD_RE = re.compile(rf"[^\W_{CJK}]+")  # a run of letters/digits outside CJK
_CJK_RE = re.compile(f"[{CJK}]")
# Each word of a document becomes one private-use character (planes 15-16: never CJK, never
# \w), so the token sequence is one string and its code points one numpy array.
_PUA0, _PUA_N = 0xF0000, 0x1FFFE
_PUA_RE = re.compile("[\U000f0000-\U0010ffff]")
_NOT_TOKEN_RE = re.compile(f"[^{CJK}\U000f0000-\U0010ffff]+")
_WORD_BIT = np.uint64(1 << 63)  # word codes never equal a code point
_MULT = np.uint64(0x9E3779B97F4A7C15)


def _normalize(text: str) -> str:
    # The input's own private-use characters are not tokens (they would pose as words).
    return _PUA_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold())


def _token_string(text: str) -> tuple[str, list[str]] | None:
    """(one character per token: CJK characters as themselves, words as private-use
    characters; the words by private-use index), or None when the document has more distinct
    words than private-use characters (then ``_tokens_slow``)."""
    table: dict[str, int] = {}

    def code(m: re.Match[str]) -> str:
        return chr(_PUA0 + table.setdefault(m.group(), len(table)) % _PUA_N)

    s = _NOT_TOKEN_RE.sub("", _WORD_RE.sub(code, _normalize(text)))
    return None if len(table) > _PUA_N else (s, list(table))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 arithmetic wraps: that is the point)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_code(word: str) -> int:
    return xxhash.xxh64_intdigest(word.encode("utf-8")) | (1 << 63)


@dataclass
class _Tokens:
    """A text's tokens: ``codes`` (uint64, one per token) and how to show a span of them."""

    codes: np.ndarray
    shown: _Shown | list[str]  # token strings, index-aligned with codes (sliced to show)

    @classmethod
    def of(cls, text: str) -> _Tokens:
        got = _token_string(text)
        if got is None:
            return cls._slow(text)
        s, words = got
        cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        pua = cps >= _PUA0
        if words:
            word_codes = np.array([_word_code(w) for w in words], dtype=np.uint64)
            cps[pua] = word_codes[(cps[pua] - np.uint64(_PUA0)).astype(np.int64)]
        return cls(cps, _Shown(s, words))

    @classmethod
    def _slow(cls, text: str) -> _Tokens:
        """Token by token, for documents with over 131k distinct words (the same codes)."""
        toks = re.findall(f"[{CJK}]|{_WORD_RE.pattern}", _normalize(text))
        codes = [ord(t) if _CJK_RE.fullmatch(t) else _word_code(t) for t in toks]
        return cls(np.array(codes, dtype=np.uint64), toks)

    def hashes(self, n: int, starts: int | None = None) -> np.ndarray:
        """Hashes of the n-grams in order (those starting before ``starts``, if given)."""
        count = len(self.codes) - n + 1
        if starts is not None:
            count = min(count, starts)
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        mixed = _mix(self.codes)
        h = np.zeros(count, dtype=np.uint64)
        for j in range(n):
            h = h * _MULT + mixed[j:j + count]
        return _mix(h)

    def show(self, start: int, n: int) -> str:
        """Tokens ``start:start+n`` as text: CJK characters joined, words spaced."""
        return _join(self.shown[start:start + n])


@dataclass
class _Shown:
    """The token strings of a token string, computed on access (only hits are shown)."""

    s: str
    words: list[str]

    def __getitem__(self, sl: slice) -> list[str]:
        return [self.words[ord(c) - _PUA0] if ord(c) >= _PUA0 else c for c in self.s[sl]]

    def __len__(self) -> int:
        return len(self.s)


def _join(tokens: Iterable[str]) -> str:
    out: list[str] = []
    prev_cjk = True
    for t in tokens:
        cjk = bool(_CJK_RE.fullmatch(t))
        if out and not (cjk and prev_cjk):
            out.append(" ")
        out.append(t)
        prev_cjk = cjk
    return "".join(out)


def tokenize(text: str) -> list[str]:
    """The tokens of ``text`` as n-grams see them."""
    t = _Tokens.of(text)
    return list(t.shown[0:len(t.shown)])


def token_text(text: str) -> str:
    """``text`` as its tokens, shown the way hits show their n-gram (for inspection)."""
    return _join(tokenize(text))


def ngrams(text: str, n: int) -> list[str]:
    """The n-grams of ``text`` in order, as text (for tests and inspection)."""
    t = _Tokens.of(text)
    return [t.show(i, n) for i in range(len(t.codes) - n + 1)]


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the n-grams of ``text``, in order (not deduplicated)."""
    return _Tokens.of(text).hashes(n)


# ----------------------------------------------------------------------------- benchmarks


@dataclass(frozen=True)
class BenchItem:
    benchmark: str  # the benchmark directory's name (``cmmlu``, ``ceval``)
    split: str
    subject: str
    id: str
    question: str
    options: tuple[str, ...]  # A..D


def load_items(dirs: Sequence[str], splits: Sequence[str] = ()) -> list[BenchItem]:
    """Every item of every split (or of ``splits``) of the benchmark directories, read by
    the eval loaders (``steelworks.data.benchmarks``: C-Eval or CMMLU, told apart by
    ``detect_layout``), so a malformed file is the same error here as in an eval."""
    from steelworks.data.benchmarks import LETTERS, detect_layout, load_benchmark

    items: list[BenchItem] = []
    for d in dirs:
        name = Path(d).name
        wanted = [s for s in SPLITS[detect_layout(d)] if not splits or s in splits]
        found = []
        for split in wanted:
            try:
                subjects, by_subject = load_benchmark(d, split)
            except FileNotFoundError:  # this directory has no such split
                continue
            found.append(split)
            items += [BenchItem(name, split, it.subject, it.id, it.question,
                                tuple(it.options[k] for k in LETTERS))
                      for s in subjects for it in by_subject[s.name]]
        if not found:
            raise FileNotFoundError(f"benchmark {d}: none of the splits {wanted} is there")
    return items


def _item_hashes(item: BenchItem, n: int) -> np.ndarray:
    """The item's n-grams that start in its question, over the question + options, plain
    and lettered (see the module docstring)."""
    from steelworks.data.benchmarks import LETTERS

    q = _Tokens.of(item.question)
    plain = " ".join([item.question, *item.options])
    lettered = " ".join([item.question, *(f"{k}. {o}" for k, o in zip(LETTERS, item.options))])
    return np.unique(np.concatenate([_Tokens.of(t).hashes(n, starts=len(q.codes))
                                     for t in (plain, lettered)]))


@dataclass
class NgramIndex:
    """The benchmarks' n-grams: sorted unique ``keys``; for key k the (benchmark, item)
    pairs ``entry_bench/entry_item[starts[k]:starts[k+1]]``, one per benchmark that has it
    (its first item in load order), so a document is attributed to every benchmark it
    overlaps."""

    n: int
    keys: np.ndarray  # uint64, sorted, unique
    starts: np.ndarray  # int64, len(keys) + 1
    entry_bench: np.ndarray  # int32
    entry_item: np.ndarray  # int32
    benchmarks: list[str]
    items: list[tuple[str, str, str, str]]  # (benchmark, split, subject, id)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # per benchmark

    @classmethod
    def build(cls, items: Sequence[BenchItem], ngram: int) -> NgramIndex:
        benchmarks = list(dict.fromkeys(i.benchmark for i in items))
        bench_of = {b: k for k, b in enumerate(benchmarks)}
        stats = {b: {"splits": [], "items": 0, "too_short": 0, "ngrams": 0} for b in benchmarks}
        hashes, bench, item = [], [], []
        for k, it in enumerate(items):
            h = _item_hashes(it, ngram)
            st = stats[it.benchmark]
            st["items"] += 1
            st["too_short"] += not len(h)
            if it.split not in st["splits"]:
                st["splits"].append(it.split)
            hashes.append(h)
            bench.append(np.full(len(h), bench_of[it.benchmark], dtype=np.int32))
            item.append(np.full(len(h), k, dtype=np.int32))
        h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        b = np.concatenate(bench) if bench else np.empty(0, np.int32)
        i = np.concatenate(item) if item else np.empty(0, np.int32)
        order = np.lexsort((i, b, h))  # by hash, then benchmark, then item (load order)
        h, b, i = h[order], b[order], i[order]
        first = np.ones(len(h), dtype=bool)  # one entry per (hash, benchmark): its first item
        first[1:] = (h[1:] != h[:-1]) | (b[1:] != b[:-1])
        h, b, i = h[first], b[first], i[first]
        keys, starts = np.unique(h, return_index=True)
        for k, name in enumerate(benchmarks):
            stats[name]["ngrams"] = int((b == k).sum())
        return cls(ngram, keys, np.append(starts, len(h)).astype(np.int64), b, i, benchmarks,
                   [(x.benchmark, x.split, x.subject, x.id) for x in items], stats)

    def match(self, text: str) -> list[dict[str, str]]:
        """One hit per benchmark the text overlaps (in benchmark order), each with the
        benchmark item of the text's first overlapping n-gram and that n-gram's text."""
        if not len(self.keys):
            return []
        toks = _Tokens.of(text)
        h = toks.hashes(self.n)
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[pos] == h)
        found: dict[int, tuple[int, int]] = {}  # benchmark -> (position in text, item)
        for p in hit:  # only documents with a hit get here
            k = pos[p]
            for e in range(self.starts[k], self.starts[k + 1]):
                found.setdefault(int(self.entry_bench[e]), (int(p), int(self.entry_item[e])))
            if len(found) == len(self.benchmarks):
                break
        hits = []
        for b in sorted(found):
            p, i = found[b]
            bench, split, subject, item_id = self.items[i]
            hits.append({"benchmark": bench, "split": split, "subject": subject, "id": item_id,
                         "ngram": toks.show(p, self.n)})
        return hits


def build_index(cfg: DecontamConfig) -> NgramIndex:
    return NgramIndex.build(load_items(cfg.benchmarks, cfg.splits), cfg.ngram)


# ----------------------------------------------------------------------------- Ray Data


def _resolve(index: Any) -> NgramIndex:
    """The index from an object reference (what the driver passes) or as is (tests)."""
    import ray

    return ray.get(index) if isinstance(index, ray.ObjectRef) else index


def _sft_text(messages: str) -> str:
    return "\n".join(m["content"] for m in json.loads(messages))


def mark_contaminated(batch: pd.DataFrame, index: Any, action: str, kind: str) -> pd.DataFrame:
    """Ray Data batch function: every kept row gets its hits in ``contam`` (JSON, "" when
    none); with ``action="drop"`` a row with hits becomes ``contaminated``. Other rows are
    already in their bucket and are not checked. SFT rows are checked on their message
    contents joined."""
    idx = _resolve(index)
    kept = (batch["status"] == KEPT).to_numpy()
    col = batch["text"] if kind == "text" else batch["messages"]
    out = []
    for k, value in zip(kept, col):
        hits = idx.match(value if kind == "text" else _sft_text(value)) if k else []
        out.append(json.dumps(hits, ensure_ascii=False) if hits else "")
    batch = batch.copy()
    batch[COLUMN] = pd.Series(out, index=batch.index, dtype=object)
    if action == "drop":
        batch.loc[(batch[COLUMN] != "").to_numpy(), "status"] = CONTAMINATED
    return batch


def decontaminate(ds, index_ref: Any, cfg: DecontamConfig, kind: str):
    """``ds`` with every kept row checked (``mark_contaminated``)."""
    return ds.map_batches(mark_contaminated, batch_format="pandas",
                          fn_kwargs={"index": index_ref, "action": cfg.action, "kind": kind})


def contaminated_rows(ds) -> list[dict[str, Any]]:
    """The rows with hits (source, path, line, contam), to the driver: like quarantined
    rows, these are expected to be few."""
    from ray.data.expressions import col

    return (ds.filter(expr=col(COLUMN) != "").select_columns(["source", "path", "line", COLUMN])
              .take_all())


def report_lines(rows: Iterable[dict[str, Any]]) -> list[str]:
    """``decontam.jsonl``: every matched document with its hits, by (path, line)."""
    rows = sorted(rows, key=lambda r: (r["path"], int(r["line"])))
    return [json.dumps({"source": r["source"], "path": r["path"], "line": int(r["line"]),
                        "hits": json.loads(r[COLUMN])}, ensure_ascii=False) + "\n" for r in rows]


def summarize(index: NgramIndex, rows: Iterable[dict[str, Any]], examples: int,
              action: str) -> dict[str, Any]:
    """The manifest's ``decontam`` entry: per benchmark what was checked (splits, items,
    too_short, ngrams), the documents that overlap it and the first ``examples`` of them by
    (path, line). A document overlapping two benchmarks counts under both, once in ``docs``."""
    rows = sorted(rows, key=lambda r: (r["path"], int(r["line"])))
    benches = {b: {**index.stats[b], "docs": 0, "examples": []} for b in index.benchmarks}
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        for h in json.loads(r[COLUMN]):
            b = benches[h["benchmark"]]
            b["docs"] += 1
            if len(b["examples"]) < examples:
                b["examples"].append({"source": r["source"], "path": r["path"],
                                      "line": int(r["line"]),
                                      **{k: h[k] for k in ("split", "subject", "id", "ngram")}})
    return {"action": action, "ngram": index.n, "docs": len(rows), "by_source": by_source,
            "benchmarks": benches}


class Step:
    """The step as the cleaning job runs it: the index built once in the driver and put in
    the object store, each dataset marked, the matched rows gathered, the report written."""

    def __init__(self, cfg: DecontamConfig) -> None:
        import logging
        import time

        import ray

        t0 = time.perf_counter()
        self.cfg, self.index = cfg, build_index(cfg)
        self.ref = ray.put(self.index)  # once: every task reads the same copy
        self.rows: list[dict[str, Any]] = []
        logging.getLogger(__name__).info(
            "decontam: %d n-grams of %s (%.1f s)", len(self.index.keys), self.index.stats,
            time.perf_counter() - t0)

    def apply(self, ds, kind: str):
        return decontaminate(ds, self.ref, self.cfg, kind)

    def collect(self, ds) -> None:
        self.rows += contaminated_rows(ds)

    def finish(self, out_dir: Path) -> tuple[str, dict[str, Any]]:
        """Write ``decontam.jsonl``; -> (its name, the manifest's ``decontam`` entry)."""
        from steelworks.core.atomic import atomic_open

        with atomic_open(out_dir / "decontam.jsonl") as f:
            f.writelines(report_lines(self.rows))
        return "decontam.jsonl", summarize(self.index, self.rows, self.cfg.examples, self.cfg.action)
