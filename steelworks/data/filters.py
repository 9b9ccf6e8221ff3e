"""Per-document quality statistics, Chinese-aware, computed together in one pass.

The statistics follow data-juicer's filters as used by Steel-LLM (links to each definition
below), so its thresholds carry over. What "a word" is: every CJK character (Han, kana,
hangul) is one word, and every run of other letters/digits (apostrophes inside allowed,
``don't``) is one word, lower-cased. This is a regex tokenizer, not jieba: no dictionary,
no model, and a Chinese 10-word n-gram is a 10-character n-gram without punctuation.

``compute_stats(text, specs)`` builds the shared pieces (lines, the word sequence, the
code-point array) once per document and only when a requested stat needs them. Counting
is done with regexes and numpy, never a Python loop per character: this runs on every
document of the corpus.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# Unicode script ranges. Kana excludes U+30FB (katakana middle dot, common in Chinese too).
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f"
KANA = "\u3040-\u309f\u30a0-\u30fa\u30fc-\u30ff\u31f0-\u31ff\uff66-\uff9d"
HANGUL = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff"
LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
CJK = HAN + KANA + HANGUL

# A non-CJK word: letters/digits of any other script, apostrophes inside.
_TOKEN = rf"[^\W_{CJK}]+(?:['’][^\W_{CJK}]+)*"
_TOKEN_RE = re.compile(_TOKEN)
# Each word becomes one character of a "word string" (CJK characters stand for themselves,
# other tokens get a private-use code point per distinct token), so word n-grams are
# substrings and get the same fast counting as character n-grams.
_PUA0, _PUA_N = 0xF0000, 0x1FFFE  # planes 15-16, never CJK, never \w
_PUA_RE = re.compile("[\U000f0000-\U0010ffff]")
_NOT_WORD_RE = re.compile(f"[^{CJK}\U000f0000-\U0010ffff]+")
_NON_ALNUM_RE = re.compile(r"[\W_]+")  # \w is str.isalnum() plus "_"

# data-juicer's SPECIAL_CHARACTERS (data_juicer/ops/common/special_characters.py, itself
# from huggingface.co/spaces/huggingface/text-data-filtering): ASCII punctuation, ASCII
# digits, whitespace, a hand-made list of symbols, and every emoji. The list is kept as is,
# quirks included (it holds the Han 一 上 士 and katakana ー ン ッ ツ シ), because Steel-LLM's
# 0.25 threshold was tuned against it.
_DJ_OTHER = (
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b\u3000\u00a0\ufffc"
    "’“”–ー一▬…✦�£•€«»°·═×士＾˘⇓↓↑←→（）§″′´¿−±∈¢ø‚„½¼¾¹²³―⁃，ˌ¸‹›ʺˈʻ¦‐⠀‰‑≤≥‖"
    "◆●■►▼▲▴∆▻¡★☆✱ːº。¯˜¥ɪ≈†上ン：∼⁄・♡✓⊕․．⋅÷１‟；،、¨ाাी्े◦˚"
    "゜ʼ≖ʼ¤ッツシ℃√！【】‿∞➤～πه۩☛₨➩☻๑٪♥ıॽ《‘©﴿٬？▷Г♫∟™ª₪®「—❖」﴾》"
)
# data-juicer adds emoji.EMOJI_DATA; the emoji package is no dependency here, so its
# single-code-point entries are approximated by the emoji blocks and listed symbols.
_EMOJI = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf"
    "\u23e9-\u23f3\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf"
    "\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299"
    "\U0001f000-\U0001faff"
)
SPECIAL_CHARACTERS = frozenset(string.punctuation + string.digits + string.whitespace + _DJ_OTHER)
_SPECIAL_RE = re.compile(
    "[" + "".join(re.escape(c) for c in sorted(SPECIAL_CHARACTERS)) + _EMOJI + "]+")

# Hash of character windows: a polynomial over code points mod 2**64 (odd multiplier).
# Distinct n-grams could collide in principle; for natural text the chance is negligible.
_MULT = np.uint64(0x9E3779B97F4A7C15)


class _Doc:
    """One document and the pieces several stats share, each built on first use."""

    __slots__ = ("text", "_lines", "_words", "_lower")

    def __init__(self, text: str) -> None:
        self.text = text
        self._lines: list[str] | None = None
        self._words: str | None = None
        self._lower: str | None = None

    @property
    def lines(self) -> list[str]:
        if self._lines is None:  # str.splitlines, as data-juicer's line filters
            self._lines = self.text.splitlines()
        return self._lines

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def words(self) -> str:
        """The word string: one character per word (see the module docstring)."""
        if self._words is None:
            text = self.lower
            if _PUA_RE.search(text):  # the input's own private-use chars are not words
                text = _PUA_RE.sub(" ", text)
            table: dict[str, str] = {}

            def code(m: re.Match[str]) -> str:
                c = table.get(m.group())
                if c is None:  # past 131k distinct tokens in a document, codes repeat
                    c = table[m.group()] = chr(_PUA0 + len(table) % _PUA_N)
                return c

            self._words = _NOT_WORD_RE.sub("", _TOKEN_RE.sub(code, text))
        return self._words


def words_of(text: str) -> list[str]:
    """The words of ``text`` as the stats count them (for tests and inspection)."""
    return re.findall(f"[{CJK}]|{_TOKEN}", text.lower())


def _ngram_counts(s: str, n: int) -> np.ndarray:
    """Occurrence count of each distinct length-``n`` substring of ``s`` (any order)."""
    m = len(s) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    cp = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    h = cp[:m].copy()
    for k in range(1, n):  # Horner's rule over the window, vectorised over positions
        h *= _MULT
        h += cp[k:k + m]
    h.sort()
    starts = np.flatnonzero(np.concatenate(([True], h[1:] != h[:-1])))
    return np.diff(np.append(starts, m))


# ---- the stats: each takes the shared _Doc and its own parameters ------------------------
def _text_length(doc: _Doc) -> float:
    """Number of characters (code points)."""
    return float(len(doc.text))


def _avg_line_length(doc: _Doc) -> float:
    """len(text) / number of lines, newlines included, as data-juicer's
    average_line_length_filter."""
    n = len(doc.lines)
    return len(doc.text) / n if n else 0.0


def _max_line_length(doc: _Doc) -> float:
    """Length of the longest line (data-juicer maximum_line_length_filter)."""
    return float(max(map(len, doc.lines), default=0))


def _alnum_ratio(doc: _Doc) -> float:
    """Share of characters with str.isalnum() (data-juicer alphanumeric_filter, character
    mode). Han characters are alphanumeric to Python, and so to data-juicer: Chinese prose
    scores high, and Steel-LLM's max 0.9 removes text with almost no punctuation."""
    n = len(doc.text)
    return len(_NON_ALNUM_RE.sub("", doc.text)) / n if n else 0.0


def _special_char_ratio(doc: _Doc) -> float:
    """Share of characters in ``SPECIAL_CHARACTERS`` (data-juicer special_characters_filter)."""
    n = len(doc.text)
    return (n - len(_SPECIAL_RE.sub("", doc.text))) / n if n else 0.0


def _rep_len(rep_len: int) -> int:
    if isinstance(rep_len, bool) or not isinstance(rep_len, int) or rep_len < 1:
        raise ValueError(f"rep_len must be a positive integer, got {rep_len!r}")
    return rep_len


def _char_rep_ratio(doc: _Doc, rep_len: int = 10) -> float:
    """data-juicer character_repetition_filter: of all character ``rep_len``-grams, the
    share taken by the k most frequent ones, k = min(isqrt(#distinct), #distinct seen more
    than once); 0 when the text is shorter than ``rep_len``."""
    counts = _ngram_counts(doc.text, _rep_len(rep_len))
    distinct = len(counts)
    if distinct == 0:
        return 0.0
    k = min(math.isqrt(distinct), int(np.count_nonzero(counts > 1)))
    if k == 0:
        return 0.0
    top = np.partition(counts, distinct - k)[distinct - k:]
    return float(top.sum()) / float(counts.sum())


def _word_rep_ratio(doc: _Doc, rep_len: int = 10) -> float:
    """data-juicer word_repetition_filter over the Chinese-aware words: the share of word
    ``rep_len``-grams whose n-gram occurs more than once."""
    counts = _ngram_counts(doc.words, _rep_len(rep_len))
    total = int(counts.sum())
    return float(counts[counts > 1].sum()) / total if total else 0.0


def _num_words(doc: _Doc) -> float:
    """Number of words (data-juicer words_num_filter, with the word rule above)."""
    return float(len(doc.words))


@dataclass(frozen=True)
class FlaggedWords:
    """A compiled flagged-word list: one regex, a trie of the entries, longest match first."""

    entries: tuple[str, ...]
    pattern: re.Pattern[str]


_WORDCH = f"[^\\W_{CJK}]"  # a letter/digit that is not CJK: words of this kind need edges


def _trie_regex(words: Sequence[str]) -> str:
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = w

    def emit(node: dict[str, Any], first: bool) -> str:
        alts = []
        for ch in sorted(c for c in node if c):
            head = (f"(?<!{_WORDCH})" if first and re.fullmatch(_WORDCH, ch) else "")
            alts.append(head + re.escape(ch) + emit(node[ch], False))
        if "" in node:  # an entry ends here: prefer the longer entries, then this one
            alts.append(f"(?!{_WORDCH})" if re.fullmatch(_WORDCH, node[""][-1]) else "")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(trie, True)


@lru_cache(maxsize=16)
def _compile_flagged(entries: tuple[str, ...]) -> FlaggedWords:
    return FlaggedWords(entries, re.compile(_trie_regex(entries)) if entries else re.compile("(?!)"))


def flagged_words_path(words: str | Path, base_dir: Path | None = None) -> Path:
    """The file a recipe's ``words: <path>`` names: a relative path is relative to
    ``base_dir``, the recipe's folder (also what the data stage's cache key hashes)."""
    path = Path(words)
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def load_flagged_words(words: Sequence[str] | str | Path | FlaggedWords,
                       base_dir: Path | None = None) -> FlaggedWords:
    """A list of entries, or the path of a UTF-8 file with one entry per line (relative
    paths resolve against ``base_dir``, the recipe's folder). Entries are lower-cased."""
    if isinstance(words, FlaggedWords):
        return words
    if isinstance(words, (str, Path)):
        words = flagged_words_path(words, base_dir).read_text(encoding="utf-8").splitlines()
    entries = sorted({w.strip().lower() for w in words if w.strip()})
    return _compile_flagged(tuple(entries))


def _flagged_words_ratio(doc: _Doc, words: Sequence[str] | str | FlaggedWords = ()) -> float:
    """Occurrences of flagged entries / number of words, capped at 1 (data-juicer
    flagged_words_filter). A Latin entry matches whole words only; an entry with CJK
    characters matches as a substring, and each occurrence counts once even though it spans
    several (one-character) words; overlapping entries match longest first."""
    n = len(doc.words)
    if n == 0:
        return 0.0
    hits = len(load_flagged_words(words).pattern.findall(doc.lower))
    return min(1.0, hits / n)


_SCRIPT_RES = {name: re.compile(f"[{chars}]+") for name, chars in
               (("han", HAN), ("kana", KANA), ("hangul", HANGUL), ("latin", LATIN))}
_LETTER_RE = re.compile(r"[^\W\d_]+")


def detect_language(text: str) -> tuple[str, float]:
    """Script-based language guess (a heuristic, not a trained classifier): count letters
    per script; Han with enough kana (>= 10% of Han+kana) is ``ja``, else Han is ``zh``;
    hangul ``ko``; Latin ``en`` (any Latin-script language); other letters ``other``.
    Returns the winning label and its share of all letters; ``("unknown", 0.0)`` without
    letters. Letters, not words, are counted, so English text weighs ~5x per word."""
    n = {k: sum(map(len, r.findall(text))) for k, r in _SCRIPT_RES.items()}
    letters = sum(map(len, _LETTER_RE.findall(text)))
    other = max(0, letters - sum(n.values()))
    han, kana = n["han"], n["kana"]
    # Han/kana first: max() keeps the first of equal counts, and ties go to Chinese.
    if kana and kana >= 0.1 * (han + kana):
        groups = {"ja": han + kana}
    else:
        groups = {"zh": han}
    groups.update(en=n["latin"], ko=n["hangul"], other=other)
    total = sum(n.values()) + other  # kana not in the winning group still counts
    if total == 0:
        return "unknown", 0.0
    lang = max(groups, key=groups.__getitem__)
    return lang, groups[lang] / total


def _lang_score(doc: _Doc, langs: Sequence[str] | str = ("zh",)) -> float:
    """The ``detect_language`` score when the detected language is in ``langs``, else 0, so
    "language in langs and score >= min_score" is one lower bound on this stat."""
    lang, score = detect_language(doc.text)
    return score if lang in ([langs] if isinstance(langs, str) else langs) else 0.0


_IMPL: dict[str, Callable[..., float]] = {
    "text_length": _text_length,
    "avg_line_length": _avg_line_length,
    "max_line_length": _max_line_length,
    "alnum_ratio": _alnum_ratio,
    "special_char_ratio": _special_char_ratio,
    "char_rep_ratio": _char_rep_ratio,
    "word_rep_ratio": _word_rep_ratio,
    "num_words": _num_words,
    "flagged_words_ratio": _flagged_words_ratio,
    "lang_score": _lang_score,
}


def _public(name: str) -> Callable[..., float]:
    impl = _IMPL[name]

    def stat(text: str, **params: Any) -> float:
        return impl(_Doc(text), **params)

    stat.__name__, stat.__doc__ = name, impl.__doc__
    return stat


# stat name -> fn(text, **params) -> float; one stat alone. Use compute_stats for several.
STATS: dict[str, Callable[..., float]] = {name: _public(name) for name in _IMPL}


def stat_params(name: str) -> dict[str, Any]:
    """The parameters a stat accepts, with their defaults (for recipe validation)."""
    sig = inspect.signature(_IMPL[name])
    return {p.name: p.default for p in list(sig.parameters.values())[1:]}


def compute_stats(text: str, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Every stat named in ``specs`` (stat name -> its parameters) for one document,
    sharing lines, words and lower-casing between them."""
    doc = _Doc(text)
    return {name: _IMPL[name](doc, **params) for name, params in specs.items()}
