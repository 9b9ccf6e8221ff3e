"""Benchmark loaders: multiple-choice items read strictly from files on disk.

Only the C-Eval layout is read here (a later loader adds CMMLU's): a directory holding
``subject_mapping.json`` (``{subject: [english_name, chinese_name, category]}``) and one CSV
per subject and split, ``{subject}_{split}.csv``, either beside the mapping or in a
``{split}/`` sub-directory (the layout of the official ``ceval-exam.zip``).  CSV columns are
``id,question,A,B,C,D,answer,explanation``; ``explanation`` is optional (the official val
files lack it) and ``answer`` may be absent or empty only in the ``test`` split.

A malformed row is an error naming the file and line, never a skipped row: a benchmark
that silently loses questions reports an accuracy over a different test.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# C-Eval "Hard": the eight subjects the C-Eval paper singles out as needing advanced reasoning.
CEVAL_HARD_SUBJECTS: frozenset[str] = frozenset(
    {
        "advanced_mathematics",
        "discrete_mathematics",
        "probability_and_statistics",
        "college_chemistry",
        "college_physics",
        "high_school_mathematics",
        "high_school_chemistry",
        "high_school_physics",
    }
)

MAPPING_FILE = "subject_mapping.json"
_REQUIRED_COLUMNS = ("id", "question", *LETTERS)
_OPTIONAL_COLUMNS = ("answer", "explanation")
# Splits whose rows must each carry a gold answer; C-Eval withholds only the test answers.
_ANSWERED_SPLITS = ("dev", "val")


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the expected layout; the message names file and line."""


@dataclass(frozen=True)
class Subject:
    name: str  # the file stem, e.g. "college_physics"
    name_en: str
    name_zh: str  # goes into the prompt header
    category: str  # C-Eval: STEM / Social Science / Humanities / Other


@dataclass(frozen=True)
class Item:
    subject: str
    id: str
    question: str
    options: dict[str, str]  # "A".."D" -> option text
    answer: str | None  # gold letter; None where the split withholds it (C-Eval test)
    explanation: str
    source: str  # the CSV file this item came from
    line: int  # 1-based line where its record starts (records may span lines)


def load_subject_mapping(directory: str | Path) -> list[Subject]:
    """Read ``subject_mapping.json`` in mapping order, checking every entry's shape."""
    path = Path(directory) / MAPPING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a C-Eval layout directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(raw, dict) or not raw:
        raise BenchmarkFormatError(f"{path}: expected a non-empty object {{subject: [...]}}")
    subjects = []
    for name, value in raw.items():
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise BenchmarkFormatError(
                f"{path}: subject {name!r}: expected [english_name, chinese_name, category], "
                f"got {value!r}"
            )
        subjects.append(Subject(name=name, name_en=value[0], name_zh=value[1], category=value[2]))
    return subjects


def _find_csv(directory: Path, subject: str, split: str) -> Path | None:
    for candidate in (directory / split / f"{subject}_{split}.csv", directory / f"{subject}_{split}.csv"):
        if candidate.exists():
            return candidate
    return None


def _check_header(path: Path, header: list[str] | None, split: str) -> list[str]:
    if header is None:
        raise BenchmarkFormatError(f"{path}:1: empty file; expected a header row")
    header = [h.strip() for h in header]
    expected = ",".join(_REQUIRED_COLUMNS + _OPTIONAL_COLUMNS)
    missing = [c for c in _REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in _REQUIRED_COLUMNS + _OPTIONAL_COLUMNS]
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if missing or unknown or duplicated:
        raise BenchmarkFormatError(
            f"{path}:1: bad header {header}: missing {missing}, unknown {unknown}, "
            f"duplicated {duplicated}; expected columns {expected}"
        )
    if split in _ANSWERED_SPLITS and "answer" not in header:
        raise BenchmarkFormatError(f"{path}:1: split {split!r} needs an 'answer' column")
    return header


def read_ceval_csv(path: str | Path, subject: str, split: str) -> list[Item]:
    """Read one C-Eval CSV; every row becomes an Item or raises BenchmarkFormatError."""
    path = Path(path)
    items: list[Item] = []
    seen_ids: dict[str, int] = {}
    # newline="" lets the csv module handle quoted fields that contain line breaks;
    # utf-8-sig drops the BOM that spreadsheet exports put in front of the header.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = _check_header(path, next(reader, None), split)
        while True:
            start = reader.line_num + 1  # line_num is the *last* line of a multi-line record
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise BenchmarkFormatError(f"{path}:{start}: unreadable CSV record: {e}") from e
            if not any(cell.strip() for cell in row):
                continue  # a blank line (e.g. a trailing one) holds no record
            if len(row) != len(header):
                raise BenchmarkFormatError(
                    f"{path}:{start}: expected {len(header)} fields ({','.join(header)}), "
                    f"got {len(row)}"
                )
            rec = dict(zip(header, row, strict=True))
            where = f"{path}:{start}"
            item_id = rec["id"].strip()
            if not item_id:
                raise BenchmarkFormatError(f"{where}: empty 'id'")
            if item_id in seen_ids:
                raise BenchmarkFormatError(
                    f"{where}: duplicate id {item_id!r} (first at line {seen_ids[item_id]})"
                )
            seen_ids[item_id] = start
            if not rec["question"].strip():
                raise BenchmarkFormatError(f"{where}: empty 'question'")
            empty = [letter for letter in LETTERS if not rec[letter].strip()]
            if empty:
                raise BenchmarkFormatError(f"{where}: missing option(s) {', '.join(empty)}")
            answer = rec.get("answer", "").strip() or None
            if answer is None and split in _ANSWERED_SPLITS:
                raise BenchmarkFormatError(f"{where}: empty 'answer'; split {split!r} needs one")
            if answer is not None and answer not in LETTERS:
                raise BenchmarkFormatError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            items.append(
                Item(
                    subject=subject,
                    id=item_id,
                    question=rec["question"].strip(),
                    options={letter: rec[letter].strip() for letter in LETTERS},
                    answer=answer,
                    explanation=rec.get("explanation", "").strip(),
                    source=str(path),
                    line=start,
                )
            )
    return items


def load_ceval_layout(directory: str | Path, split: str) -> tuple[list[Subject], dict[str, list[Item]]]:
    """Subjects that have a CSV for ``split`` (mapping order) and their items by subject name.

    A subject in the mapping without a CSV for this split is skipped with a log line (a
    partial download is legitimate); a directory with none at all is an error.
    """
    directory = Path(directory)
    subjects: list[Subject] = []
    items: dict[str, list[Item]] = {}
    missing: list[str] = []
    for subject in load_subject_mapping(directory):
        path = _find_csv(directory, subject.name, split)
        if path is None:
            missing.append(subject.name)
            continue
        subject_items = read_ceval_csv(path, subject.name, split)
        if not subject_items:
            raise BenchmarkFormatError(f"{path}: no records after the header")
        subjects.append(subject)
        items[subject.name] = subject_items
    if missing:
        log.info(
            "%s: %d subject(s) have no %s CSV and are skipped: %s",
            directory, len(missing), split, ", ".join(missing),
        )
    if not subjects:
        raise FileNotFoundError(
            f"{directory}: no '{{subject}}_{split}.csv' for any subject of {MAPPING_FILE} "
            f"(looked in {directory} and {directory / split})"
        )
    return subjects, items
