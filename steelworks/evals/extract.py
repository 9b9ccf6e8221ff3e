"""Read the chosen letter out of a free-form reply to a multiple-choice question.

Generative scoring (generative.py) lets the model answer in its own words, so the letter
has to be found in text such as "B", "答案是B。", "B. 牛顿" or "光速约为3×10^8 m/s".  The
text is first NFKC-normalised (so full-width "Ａ", "：", "（" read as "A", ":", "(") and then
the rules below are tried in order; the first that yields a letter wins, and its name is
returned with the letter so a report can say how each answer was read:

1. ``exact``: the whole reply, stripped of whitespace and punctuation at both ends, is one
   letter A-D ("B", " b。", "(C)", "【D】").  Lower case counts here only: a bare "a" can
   mean nothing else.
2. ``phrase``: an explicit answer phrase followed by a letter: "答案是X", "答案为X",
   "答案：X", "答案选X" (also "正确答案是X", "答案应该是X", "答案是选项X"), "选X" (so
   "故选X", "应选X", "选择X"), and "the answer is X" (phrase case-insensitive, "the correct answer
   is (X)" too).  The LAST phrase in the reply wins: models correct themselves ("答案是A……
   不对，答案是C") and chains of thought end with the conclusion.
3. ``leading``: the reply starts with a letter followed by punctuation or a line break
   ("B. 牛顿", "B、牛顿", "(B) 牛顿", "B：", "B\\n解析……"), or by a space and then a
   non-Latin character ("B 牛顿").
4. ``option_text``: the reply contains the full text of exactly one option.  When several
   options' texts occur, the longest wins only if no other option's text occurs outside
   the longest one's occurrences ("北京大学" picks 北京大学 over 北京; "北京还是北京大学"
   is ambiguous); a tie or any leftover occurrence is ambiguous and yields nothing.

Otherwise the reply is ``unparseable`` (letter None); the caller counts it as wrong.

Letters are upper-case A-D in rules 2 and 3 and must not be glued to further Latin letters,
so "答案是DNA", "选ATP" and "About ..." yield no letter, and a lower-case "the answer is a
bit unclear" is not an "A".  Edge cases that are deliberately *not* answers:

- several letters: "A和B都不对", "A、B", "答案是A和B", "答案是AB", "选A或B" are rejected by
  rules 1-3 (a multiple-choice reply naming two letters has not chosen one);
- negations: "不选A" / "别选A" / "勿选A" are not rule 2 matches (a later "选B" still is);
- "选项A……" mentions an option, it does not choose it, so it is not the "选X" phrase;
- an English sentence starting with the article "A" ("A bit ...", "A is right") is not a
  leading letter: after a space, only a non-Latin character makes the letter an answer.

Known limits, accepted because they are rare in exam replies: "不应该选A" still reads A; an
option text of one common character (e.g. "是") can match incidentally under rule 4.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from steelworks.data.benchmarks import LETTERS

RULE_EXACT = "exact"
RULE_PHRASE = "phrase"
RULE_LEADING = "leading"
RULE_OPTION_TEXT = "option_text"
RULE_UNPARSEABLE = "unparseable"
RULES: tuple[str, ...] = (RULE_EXACT, RULE_PHRASE, RULE_LEADING, RULE_OPTION_TEXT, RULE_UNPARSEABLE)

_LETTER = "[A-D]"
# A letter must stand alone: not followed by more Latin letters ("DNA", "AB", "About").
_ALONE = r"(?![A-Za-z])"
# Words that join two letters into a multi-answer ("A和B", "A、B", "A or B").
_MORE_LETTERS = re.compile(
    r"\s*(?:[、,/&+和与及或跟]|(?i:and|or)\b)?\s*[(\[【]?\s*[A-D](?![A-Za-z])"
)
_OPEN = r"[(\[【「]?\s*"

_PHRASES: tuple[re.Pattern[str], ...] = (
    # 答案是/为/：/选 X, with optional 应(该/当) before and 选项 after; covers 正确答案是X.
    re.compile(
        r"答案\s*(?:应该|应当|应)?\s*(?:是|为|选|:)\s*:?\s*(?:选项|选)?\s*" + _OPEN
        + f"({_LETTER}){_ALONE}"
    ),
    # 选X (故选X, 应选X), but not 不选X / 别选X / 勿选X, and not 选项X (a mention).
    re.compile(r"(?<![不别勿])选(?:择)?\s*" + _OPEN + f"({_LETTER}){_ALONE}"),
    re.compile(
        # Only the phrase ignores case: "the answer is a bit ..." must not read as "A".
        r"(?i:the\s+(?:correct\s+|right\s+|final\s+)?answer\s+(?:is|would\s+be|should\s+be))"
        r"\s*:?\s*" + _OPEN + f"({_LETTER}){_ALONE}"
    ),
)
# (X) / 【X】 at the start: the bracket closes the letter, whatever follows.
_LEADING_BRACKETED = re.compile(r"[(\[【「]\s*([A-D])\s*[)\]】」]")
# X then punctuation, a line break, or a space and a non-Latin character.
_LEADING_BARE = re.compile(r"([A-D])(?:\s*[.:)\]】」;；、,，。!?！？]|[ \t]*\n|[ \t]+(?=[^\x00-\x7f])|\s*$)")


def _normalise(text: str) -> str:
    # NFKC folds full-width forms (Ａ, ：, （) to ASCII; CJK punctuation (、。) is kept.
    return unicodedata.normalize("NFKC", text)


def _is_punct_or_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] == "P"


def _strip_punct(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _is_punct_or_space(text[start]):
        start += 1
    while end > start and _is_punct_or_space(text[end - 1]):
        end -= 1
    return text[start:end]


def _single_letter(text: str, end: int) -> bool:
    """True when no second letter follows position ``end`` as part of a list ("A和B")."""
    return _MORE_LETTERS.match(text, end) is None


def _exact(text: str) -> str | None:
    core = _strip_punct(text)
    return core.upper() if len(core) == 1 and core.upper() in LETTERS else None


def _phrase(text: str) -> str | None:
    best: tuple[int, str] | None = None
    for pattern in _PHRASES:
        for m in pattern.finditer(text):
            if _single_letter(text, m.end(1)) and (best is None or m.start(1) > best[0]):
                best = (m.start(1), m.group(1))
    return None if best is None else best[1]


def _leading(text: str) -> str | None:
    body = text.lstrip()
    m = _LEADING_BRACKETED.match(body)
    if m is not None:
        return m.group(1) if _single_letter(body, m.end()) else None
    m = _LEADING_BARE.match(body)
    if m is not None and _single_letter(body, m.end(1)):
        return m.group(1)
    return None


def _option_text(text: str, options: Mapping[str, str]) -> str | None:
    found = {
        letter: norm
        for letter, option in options.items()
        if (norm := _normalise(option).strip()) and norm in text
    }
    if not found:
        return None
    longest = max(len(t) for t in found.values())
    top = [letter for letter, t in found.items() if len(t) == longest]
    if len(top) != 1:
        return None  # two options of the same length both occur
    winner = top[0]
    rest = text.replace(found[winner], "\x00")
    if any(t in rest for letter, t in found.items() if letter != winner):
        return None  # a shorter option also occurs on its own
    return winner


def extract_answer(text: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    """``(letter, rule)`` for a reply; ``(None, "unparseable")`` when no rule applies.

    ``options`` maps "A".."D" to option text (an ``Item.options``); only rule 4 reads it.
    """
    norm = _normalise(text)
    if (letter := _exact(norm)) is not None:
        return letter, RULE_EXACT
    if (letter := _phrase(norm)) is not None:
        return letter, RULE_PHRASE
    if (letter := _leading(norm)) is not None:
        return letter, RULE_LEADING
    if (letter := _option_text(norm, options)) is not None:
        return letter, RULE_OPTION_TEXT
    return None, RULE_UNPARSEABLE
