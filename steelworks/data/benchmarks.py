"""Benchmark loaders: multiple-choice items read strictly from files on disk.

Two layouts are read, and ``load_benchmark`` tells them apart:

- C-Eval: a directory holding ``subject_mapping.json``
  (``{subject: [english_name, chinese_name, category]}``) and one CSV per subject and split,
  ``{subject}_{split}.csv``, either beside the mapping or in a ``{split}/`` sub-directory (the
  layout of the official ``ceval-exam.zip``).  CSV columns are
  ``id,question,A,B,C,D,answer,explanation``; ``explanation`` is optional (the official val
  files lack it) and ``answer`` may be absent or empty only in the ``test`` split.
- CMMLU: ``{dev,test}/{subject}.csv`` with columns ``,Question,A,B,C,D,Answer`` (the first,
  unnamed column is the row index, which becomes the item id).  Every split has answers.
  Names, categories and the China-specific flag come from the packaged map
  (``steelworks.data.subjects``), since CMMLU's data folders carry none.

A malformed row is an error naming the file and line, never a skipped row: a benchmark
that silently loses questions reports an accuracy over a different test.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# CEVAL_HARD_SUBJECTS is re-exported: it was defined here before the subject facts moved.
from steelworks.data.subjects import CEVAL_HARD_SUBJECTS, CEVAL_SUBJECTS, CMMLU_SUBJECTS

log = logging.getLogger(__name__)

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

MAPPING_FILE = "subject_mapping.json"
_REQUIRED_COLUMNS = ("id", "question", *LETTERS)
_OPTIONAL_COLUMNS = ("answer", "explanation")
# Splits whose rows must each carry a gold answer; C-Eval withholds only the test answers.
_ANSWERED_SPLITS = ("dev", "val")
# CMMLU's header as its CSVs have it (pandas' to_csv with the index): exactly these columns.
CMMLU_HEADER: tuple[str, ...] = ("", "Question", *LETTERS, "Answer")
CMMLU_SPLITS: tuple[str, ...] = ("dev", "test")
Layout = Literal["ceval", "cmmlu"]


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the expected layout; the message names file and line."""


@dataclass(frozen=True)
class Subject:
    name: str  # the file stem, e.g. "college_physics"
    name_en: str
    name_zh: str  # goes into the prompt header
    category: str  # C-Eval and CMMLU alike: STEM / Social Science / Humanities / Other
    # Which benchmark the subject belongs to: both have e.g. "high_school_physics", and only
    # C-Eval's is in C-Eval Hard.  Defaults to C-Eval, the layout this class first served.
    benchmark: str = "ceval"
    china_specific: bool = False  # CMMLU's China-specific group (C-Eval has no such flag)

    @property
    def hard(self) -> bool:
        """In C-Eval Hard (the C-Eval paper's eight advanced-reasoning subjects)."""
        return self.benchmark == "ceval" and self.name in CEVAL_HARD_SUBJECTS


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


def ceval_subjects() -> list[Subject]:
    """The 52 C-Eval subjects from the packaged map, for directories that lack the mapping."""
    return [Subject(name, *info) for name, info in CEVAL_SUBJECTS.items()]


def cmmlu_subjects() -> list[Subject]:
    """The 67 CMMLU subjects from the packaged map (CMMLU ships no English names: the
    English name is the file stem in title case)."""
    return [
        Subject(
            name=name,
            name_en=name.replace("_", " ").title(),
            name_zh=info.name_zh,
            category=info.category,
            benchmark="cmmlu",
            china_specific=info.china_specific,
        )
        for name, info in CMMLU_SUBJECTS.items()
    ]


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


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """The header (line 1) and then each non-blank record with the line it starts on."""
    # newline="" lets the csv module handle quoted fields that contain line breaks;
    # utf-8-sig drops the BOM that spreadsheet exports put in front of the header.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        while True:
            start = reader.line_num + 1  # line_num is the *last* line of a multi-line record
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise BenchmarkFormatError(f"{path}:{start}: unreadable CSV record: {e}") from e
            if start > 1 and not any(cell.strip() for cell in row):
                continue  # a blank line (e.g. a trailing one) holds no record
            yield start, row


def _make_item(
    where: str,
    subject: str,
    item_id: str,
    question: str,
    options: dict[str, str],
    answer: str,
    explanation: str,
    *,
    answer_required: str | None,  # why an empty answer is an error; None where it is not
    seen_ids: dict[str, int],
    source: Path,
    line: int,
) -> Item:
    """Check one record's fields and build its Item; any fault names ``where`` (file:line)."""
    item_id = item_id.strip()
    if not item_id:
        raise BenchmarkFormatError(f"{where}: empty 'id'")
    if item_id in seen_ids:
        raise BenchmarkFormatError(
            f"{where}: duplicate id {item_id!r} (first at line {seen_ids[item_id]})"
        )
    seen_ids[item_id] = line
    if not question.strip():
        raise BenchmarkFormatError(f"{where}: empty 'question'")
    empty = [letter for letter in LETTERS if not options[letter].strip()]
    if empty:
        raise BenchmarkFormatError(f"{where}: missing option(s) {', '.join(empty)}")
    gold = answer.strip() or None
    if gold is None and answer_required is not None:
        raise BenchmarkFormatError(f"{where}: empty 'answer'; {answer_required}")
    if gold is not None and gold not in LETTERS:
        raise BenchmarkFormatError(f"{where}: answer {gold!r} is not one of A, B, C, D")
    return Item(
        subject=subject,
        id=item_id,
        # The question stripped and the options as the file has them, spaces included: what
        # lm-eval's built-in cmmlu and ceval templates render ("{{Question.strip()}}\nA. {{A}}").
        # Stripping options too changed 6 of 11,582 held-out CMMLU predictions against lm-eval.
        question=question.strip(),
        options={letter: options[letter] for letter in LETTERS},
        answer=gold,
        explanation=explanation.strip(),
        source=str(source),
        line=line,
    )


def _check_width(path: Path, start: int, row: list[str], header: list[str] | tuple[str, ...]) -> None:
    if len(row) != len(header):
        raise BenchmarkFormatError(
            f"{path}:{start}: expected {len(header)} fields ({','.join(header)}), got {len(row)}"
        )


def read_ceval_csv(path: str | Path, subject: str, split: str) -> list[Item]:
    """Read one C-Eval CSV; every row becomes an Item or raises BenchmarkFormatError."""
    path = Path(path)
    items: list[Item] = []
    seen_ids: dict[str, int] = {}
    records = _records(path)
    first = next(records, None)
    header = _check_header(path, None if first is None else first[1], split)
    for start, row in records:
        _check_width(path, start, row, header)
        rec = dict(zip(header, row, strict=True))
        items.append(
            _make_item(
                f"{path}:{start}", subject, rec["id"], rec["question"],
                {letter: rec[letter] for letter in LETTERS},
                rec.get("answer", ""), rec.get("explanation", ""),
                answer_required=f"split {split!r} needs one" if split in _ANSWERED_SPLITS else None,
                seen_ids=seen_ids, source=path, line=start,
            )
        )
    return items


def read_cmmlu_csv(path: str | Path, subject: str) -> list[Item]:
    """Read one CMMLU CSV (``,Question,A,B,C,D,Answer``); every row becomes an Item (its id the
    index column) or raises BenchmarkFormatError.  CMMLU publishes answers for every split."""
    path = Path(path)
    items: list[Item] = []
    seen_ids: dict[str, int] = {}
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise BenchmarkFormatError(f"{path}:1: empty file; expected a header row")
    header = [h.strip() for h in first[1]]
    if tuple(header) != CMMLU_HEADER:
        raise BenchmarkFormatError(
            f"{path}:1: bad header {header}; expected CMMLU columns {','.join(CMMLU_HEADER)}"
        )
    for start, row in records:
        _check_width(path, start, row, CMMLU_HEADER)
        index, question, a, b, c, d, answer = row
        items.append(
            _make_item(
                f"{path}:{start}", subject, index, question, dict(zip(LETTERS, (a, b, c, d))),
                answer, "", answer_required="CMMLU gives every question's answer", seen_ids=seen_ids,
                source=path, line=start,
            )
        )
    return items


def _collect(
    candidates: list[Subject], find: Callable[[str], Path | None],
    read: Callable[[Path, str], list[Item]], where: Path, split: str,
) -> tuple[list[Subject], dict[str, list[Item]]]:
    """Read each candidate subject's CSV (in candidate order). A subject without one is
    skipped with a log line (a partial download is legitimate); an empty CSV is an error."""
    subjects: list[Subject] = []
    items: dict[str, list[Item]] = {}
    missing: list[str] = []
    for subject in candidates:
        path = find(subject.name)
        if path is None:
            missing.append(subject.name)
            continue
        subject_items = read(path, subject.name)
        if not subject_items:
            raise BenchmarkFormatError(f"{path}: no records after the header")
        subjects.append(subject)
        items[subject.name] = subject_items
    if missing:
        log.info("%s: %d subject(s) have no %s CSV and are skipped: %s",
                 where, len(missing), split, ", ".join(missing))
    return subjects, items


def load_ceval_layout(directory: str | Path, split: str) -> tuple[list[Subject], dict[str, list[Item]]]:
    """Subjects that have a CSV for ``split`` (mapping order) and their items by subject name.

    A subject in the mapping without a CSV for this split is skipped with a log line (a
    partial download is legitimate); a directory with none at all is an error.
    """
    directory = Path(directory)
    return _load_ceval(directory, split, load_subject_mapping(directory))


def _load_ceval(
    directory: Path, split: str, mapping: list[Subject]
) -> tuple[list[Subject], dict[str, list[Item]]]:
    subjects, items = _collect(mapping, lambda name: _find_csv(directory, name, split),
                               lambda path, name: read_ceval_csv(path, name, split), directory, split)
    if not subjects:
        raise FileNotFoundError(
            f"{directory}: no '{{subject}}_{split}.csv' for any subject of {MAPPING_FILE} "
            f"(looked in {directory} and {directory / split})"
        )
    return subjects, items


def load_cmmlu_layout(directory: str | Path, split: str) -> tuple[list[Subject], dict[str, list[Item]]]:
    """Subjects that have ``{split}/{subject}.csv`` (map order) and their items by subject name.

    As for C-Eval, a subject without a CSV is skipped with a log line and a directory with
    none is an error.  A CSV whose subject is not in the CMMLU map is an error too: it has no
    category, and dropping it would report accuracy over fewer questions than are on disk.
    """
    directory = Path(directory)
    split_dir = directory / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is not a directory: no CMMLU {split!r} split "
            f"(CMMLU has {', '.join(CMMLU_SPLITS)})"
        )
    present = {p.stem: p for p in split_dir.glob("*.csv")}
    unknown = sorted(set(present) - set(CMMLU_SUBJECTS))
    if unknown:
        raise BenchmarkFormatError(
            f"{split_dir}: CSV(s) for subject(s) not in the CMMLU map: {', '.join(unknown)} "
            f"(the 67 known subjects are in steelworks/data/subjects.py)"
        )
    subjects, items = _collect(cmmlu_subjects(), present.get, read_cmmlu_csv, split_dir, split)
    if not subjects:
        raise FileNotFoundError(f"{split_dir}: no '{{subject}}.csv' for any CMMLU subject")
    return subjects, items


_CEVAL_SPLITS = ("dev", "val", "test")


def detect_layout(directory: str | Path) -> Layout:
    """"ceval" or "cmmlu", from what the directory holds.

    C-Eval: ``subject_mapping.json``, or ``{subject}_{dev,val,test}.csv`` files beside it or in
    split folders (``ceval-exam.zip`` has ``dev/``, ``val/``, ``test/`` too, so the folders
    alone do not decide).  CMMLU: ``dev/`` or ``test/`` holding CSVs named by subject only.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    if (directory / MAPPING_FILE).exists():
        return "ceval"
    suffixes = tuple(f"_{split}.csv" for split in _CEVAL_SPLITS)
    folders = [directory] + [directory / split for split in _CEVAL_SPLITS]
    names = [p.name for folder in folders if folder.is_dir() for p in folder.glob("*.csv")]
    if any(name.endswith(suffixes) for name in names):
        return "ceval"
    if any(
        (directory / split).is_dir() and any((directory / split).glob("*.csv"))
        for split in CMMLU_SPLITS
    ):
        return "cmmlu"
    raise FileNotFoundError(
        f"{directory}: neither a C-Eval layout ({MAPPING_FILE} or '{{subject}}_{{split}}.csv' "
        f"files) nor a CMMLU one ('dev/' or 'test/' holding '{{subject}}.csv' files)"
    )


def load_benchmark(directory: str | Path, split: str) -> tuple[list[Subject], dict[str, list[Item]]]:
    """Load ``split`` from a C-Eval or CMMLU directory, whichever ``detect_layout`` finds.

    A C-Eval directory without ``subject_mapping.json`` (the official zip has none) uses the
    packaged C-Eval map; a CSV for a subject outside it is then an error, not a lost subject.
    """
    directory = Path(directory)
    if detect_layout(directory) == "cmmlu":
        return load_cmmlu_layout(directory, split)
    if (directory / MAPPING_FILE).exists():
        return load_ceval_layout(directory, split)
    mapping = ceval_subjects()
    known = {s.name for s in mapping}
    suffix = f"_{split}.csv"
    unknown = sorted(
        p.name
        for folder in (directory, directory / split) if folder.is_dir()
        for p in folder.glob(f"*{suffix}") if p.name[: -len(suffix)] not in known
    )
    if unknown:
        raise BenchmarkFormatError(
            f"{directory}: no {MAPPING_FILE}, and CSV(s) for subject(s) outside the C-Eval map: "
            f"{', '.join(unknown)}"
        )
    log.info("%s: no %s; using the packaged C-Eval map", directory, MAPPING_FILE)
    return _load_ceval(directory, split, mapping)
