"""Input formats: a registry of real corpus schemas, each read into the same uniform rows.

``SourceConfig.format`` names an entry of ``FORMATS``. Every reader turns one input file into
one row per record, kept or quarantined, with exactly the columns of ``ROW_COLUMNS``, so the
datasets of all sources can be unioned and counted (read = rows):

    source, path, line   where the record came from (line: 1-based line for JSON lines,
                         1-based element/row index for JSON arrays and parquet; 0 for a
                         file that could not be decoded at all)
    status, reason, raw  "kept" | "quarantined", what was wrong, the offending raw record
    text                 document text (text formats)
    messages             JSON list of {role, content} (SFT formats)
    task_type, lang      SFT tag; language tag where the source has one (Infinity-Instruct)

A record is parsed from the raw bytes in two steps: the container (``jsonl``, ``json``
array, ``parquet``, optionally ``.gz``/``.zst``-compressed) yields raw dicts, and the
format's ``convert`` maps a dict to canonical fields or raises ``RecordError``. A
``wanjuan_exam`` record yields one row per style (``exam_style: both``: two rows, same path
and line, task types ``exam_answer_first`` and ``exam_cot``); every other record one row.
Route sources with ``source_kind(src)``: a generic format is SFT when it maps ``messages``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from steelworks.data.config import SourceConfig

try:  # orjson parses JSON lines ~3x faster; optional, the stdlib gives the same results
    import orjson

    _fast_loads: Callable[[bytes], Any] | None = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None

Kind = Literal["text", "sft"]
Container = Literal["jsonl", "json", "parquet"]
Converted = dict[str, Any]
KEPT, QUARANTINED = "kept", "quarantined"
ROW_COLUMNS = ("source", "path", "line", "status", "reason", "raw", "text", "messages",
               "task_type", "lang")
RAW_LIMIT = 2000  # chars of a quarantined record kept for the report
ROLES = ("system", "user", "assistant")
# Directory scans pick files by extension. BELLE and others ship JSON lines named *.json,
# so a jsonl directory takes .json too; a file or glob given explicitly is always read.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson", ".json"), "json": (".json",), "parquet": (".parquet",)}
COMPRESSED = (".gz", ".zst")


class RecordError(ValueError):
    """A record that does not follow its format's schema; the message says what is wrong."""


@dataclass(frozen=True)
class Format:
    """``convert`` maps one raw record to ``{"text": str}`` or ``{"messages": [...],
    "task_type": str, "lang": str}`` (validated), or to a list of those when one record
    yields several rows (``wanjuan_exam``: one per style, where a style that cannot be
    rendered is ``{"error": reason, "task_type"}``, a quarantined row). A bad record
    raises ``RecordError``."""

    name: str
    kind: Kind
    container: Container
    convert: Callable[[dict[str, Any], SourceConfig], Converted | list[Converted]]


# ---- field helpers: every schema violation becomes a RecordError naming the field ----

def _str(rec: dict[str, Any], key: str, *, optional: bool = False, where: str = "") -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{where}{key}' missing or not a string")
    return value


def _list(rec: dict[str, Any], key: str, *, optional: bool = False) -> list[Any]:
    value = rec.get(key)
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise RecordError(f"field '{key}' missing or not a list")
    return value


def _join(*parts: str) -> str:
    """Readable document from parts, one per line, empty parts skipped."""
    return "\n".join(p.strip() for p in parts if p and p.strip())


def _sft(messages: Any, task_type: str, src: SourceConfig, lang: str = "") -> Converted:
    """Validated conversation; ``SourceConfig.task_type`` overrides the format's tag."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("conversation is empty or not a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise RecordError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _str(m, "content", where=f"messages[{i}].")})
    # A sample with nothing to learn from would only cost a padded sequence in training.
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise RecordError("conversation has no non-empty assistant turn")
    return {"messages": out, "task_type": src.task_type or task_type, "lang": lang}


# ---- text formats ----

def _text(rec: dict[str, Any], src: SourceConfig, *, field: str) -> Converted:
    """One string field is the document; ``columns: {text: ...}`` renames it."""
    return {"text": _str(rec, src.columns.get("text", field))}


def _baidu_baike(rec: dict[str, Any], src: SourceConfig) -> Converted:
    parts = [_str(rec, "title"), _str(rec, "summary", optional=True)]
    for i, sec in enumerate(_list(rec, "sections", optional=True)):
        if not isinstance(sec, dict):
            raise RecordError(f"field 'sections[{i}]' is not an object")
        parts += [_str(sec, "title", optional=True, where=f"sections[{i}]."),
                  _str(sec, "content", optional=True, where=f"sections[{i}].")]
    return {"text": _join(*parts)}


def _baidu_qa(rec: dict[str, Any], src: SourceConfig) -> Converted:
    # Pretraining text, not SFT: the question (title + description) followed by the answer.
    return {"text": _join(_str(rec, "title"), _str(rec, "desc", optional=True),
                          _str(rec, "answer"))}


# ---- SFT formats ----

def _alpaca(rec: dict[str, Any], src: SourceConfig) -> Converted:
    user = _join(_str(rec, "instruction"), _str(rec, "input", optional=True))
    return _sft([{"role": "user", "content": user},
                 {"role": "assistant", "content": _str(rec, "output")}], "instruction", src)


def _firefly(rec: dict[str, Any], src: SourceConfig) -> Converted:
    return _sft([{"role": "user", "content": _str(rec, "input")},
                 {"role": "assistant", "content": _str(rec, "target")}],
                _str(rec, "kind", optional=True) or "firefly", src)


# ShareGPT speakers; "user"/"assistant"/"chatgpt" appear in some ShareGPT dumps.
_SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "chatgpt": "assistant", "system": "system"}


def _sharegpt(rec: dict[str, Any], src: SourceConfig, *, task_type: str) -> Converted:
    messages = []
    for i, turn in enumerate(_list(rec, "conversations")):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in _SPEAKERS:
            raise RecordError(f"conversations[{i}].from is {speaker!r}, expected human, gpt "
                              "or system")
        messages.append({"role": _SPEAKERS[speaker],
                         "content": _str(turn, "value", where=f"conversations[{i}].")})
    return _sft(messages, task_type, src, _str(rec, "langdetect", optional=True))


def _openai(rec: dict[str, Any], src: SourceConfig) -> Converted:
    return _sft(_list(rec, src.columns.get("messages", "messages")),
                _str(rec, "task_type", optional=True) or "chat", src)


# MOSS (github.com/OpenMOSS/MOSS, SFT_data). moss-003: {"meta_instruction", "num_turns",
# "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\n", "MOSS": "<|MOSS|>: ...<eom>\n",
# plugin data also "Inner Thoughts", "Commands", "Tool Responses"}}}. moss-002:
# {"prefix", "plain_text": "[Human]: ...<eoh> [MOSS]: ...<eoa> ..."}. Both marker styles
# are accepted in either layout; plugin fields and markers are dropped.
_MOSS_MARK = re.compile(r"<\|Human\|>:|\[Human\]:|<\|MOSS\|>:|\[MOSS\]:")
_MOSS_TURN = re.compile(r"(?:<\|Human\|>|\[Human\]):\s*(?P<user>.*?)\s*<eoh>"
                        r"|(?:<\|MOSS\|>|\[MOSS\]):\s*(?P<assistant>.*?)\s*<eo[ma]>", re.S)


def _moss_strip(value: str, marker: str, end: str) -> str:
    value = re.sub(rf"^\s*(?:<\|{marker}\|>|\[{marker}\]):", "", value)
    return re.sub(rf"(?:{end})\s*$", "", value).strip()


def _moss(rec: dict[str, Any], src: SourceConfig) -> Converted:
    system = _str(rec, "meta_instruction", optional=True) or _str(rec, "prefix", optional=True)
    turns: list[dict[str, str]] = []
    if isinstance(rec.get("chat"), dict):
        def order(key: str) -> int:
            if not re.fullmatch(r"turn_\d+", key):
                raise RecordError(f"chat key {key!r} is not turn_<n>")
            return int(key[5:])
        for key in sorted(rec["chat"], key=order):
            turn = rec["chat"][key]
            if not isinstance(turn, dict):
                raise RecordError(f"field 'chat.{key}' is not an object")
            turns += [{"role": "user", "content": _moss_strip(
                          _str(turn, "Human", where=f"chat.{key}."), "Human", "<eoh>")},
                      {"role": "assistant", "content": _moss_strip(
                          _str(turn, "MOSS", where=f"chat.{key}."), "MOSS", "<eom>|<eoa>")}]
    elif isinstance(rec.get("plain_text"), str):
        text = rec["plain_text"]
        found = list(_MOSS_TURN.finditer(text))
        # Every speaker marker must open a turn closed by its end marker (<eoh>, <eom>/<eoa>).
        if not found or len(found) != len(_MOSS_MARK.findall(text)):
            raise RecordError("plain_text: a <|Human|>/<|MOSS|> turn is missing or unterminated")
        system = system or text[:found[0].start()].strip()  # a leading meta instruction
        turns = [{"role": "user" if m["user"] is not None else "assistant",
                  "content": m["user"] if m["user"] is not None else m["assistant"]}
                 for m in found]
    else:
        raise RecordError("MOSS record needs a 'chat' object (moss-003) or a 'plain_text' "
                          "string (moss-002)")
    system_turn = [{"role": "system", "content": system.strip()}] if system.strip() else []
    return _sft(system_turn + turns, "moss", src)


def _wanjuan_exam(rec: dict[str, Any], src: SourceConfig) -> list[Converted]:
    from steelworks.data.sft_builders import exam_to_messages

    styles = ["answer_first", "cot"] if src.exam_style == "both" else [src.exam_style]
    base = src.task_type or "exam"  # the style stays in the tag, so both rows stay apart
    out: list[Converted] = []
    for style in styles:
        # One row per style: an item without an explanation still gives its answer-first
        # sample, and its cot row is quarantined ({"error"}) rather than silently missing.
        try:
            out.append({**_sft(exam_to_messages(rec, style), "", src),
                        "task_type": f"{base}_{style}"})
        except ValueError as e:
            out.append({"error": f"{e} ({style} style)", "task_type": f"{base}_{style}"})
    return out


# ---- generic formats: columns map canonical fields to the source's own ----

def _generic(rec: dict[str, Any], src: SourceConfig) -> Converted:
    cols = src.columns
    if "messages" not in cols:
        out: Converted = {"text": _str(rec, cols.get("text", "text"))}
    else:
        messages = rec.get(cols["messages"])
        if isinstance(messages, str):  # a JSON-encoded list (common in parquet exports)
            try:
                messages = json.loads(messages)
            except ValueError as e:
                raise RecordError(f"field '{cols['messages']}' is not a JSON list: {e}") from e
        tag = _str(rec, cols["task_type"]) if "task_type" in cols else "chat"
        out = _sft(messages, tag, src)
    if "lang" in cols:
        out["lang"] = _str(rec, cols["lang"], optional=True)
    return out


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("jsonl", "text", "jsonl", _generic),
    Format("json", "text", "json", _generic),
    Format("parquet", "text", "parquet", _generic),
    Format("skypile", "text", "jsonl", partial(_text, field="text")),
    Format("wanjuan_text", "text", "jsonl", partial(_text, field="content")),
    Format("wikipedia_cn", "text", "json", partial(_text, field="completion")),
    Format("baidu_baike", "text", "jsonl", _baidu_baike),
    Format("baidu_qa", "text", "jsonl", _baidu_qa),
    Format("starcoder", "text", "parquet", partial(_text, field="content")),
    Format("alpaca", "sft", "jsonl", _alpaca),
    Format("belle", "sft", "jsonl", _alpaca),
    Format("firefly", "sft", "jsonl", _firefly),
    Format("moss", "sft", "jsonl", _moss),
    Format("sharegpt", "sft", "jsonl", partial(_sharegpt, task_type="sharegpt")),
    Format("infinity_instruct", "sft", "jsonl", partial(_sharegpt, task_type="infinity_instruct")),
    Format("openai", "sft", "jsonl", _openai),
    Format("wanjuan_exam", "sft", "jsonl", _wanjuan_exam),
]}
GENERIC = ("jsonl", "json", "parquet")


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown input format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_kind(name: str) -> Kind:
    """The kind of a named format; the generic ones are ``text`` unless their source maps a
    ``messages`` column, which only ``source_kind`` can see."""
    return get_format(name).kind


def source_kind(src: SourceConfig) -> Kind:
    """The kind of a configured source: use this one to route sources (text vs SFT)."""
    if src.format in GENERIC and "messages" in src.columns:
        return "sft"
    return format_kind(src.format)


def expand_paths(pattern: str, fmt: str) -> list[str]:
    """A file, a glob, or a directory (recursively: files with an extension of the format's
    container, optionally .gz/.zst), sorted so the same input always reads the same way."""
    exts = EXTENSIONS[get_format(fmt).container]
    p = Path(pattern)
    if p.is_file():  # before glob: a literal name may hold glob characters ("[1].jsonl")
        files = [pattern]
    elif p.is_dir():  # hidden files (editor swaps, macOS "._x.jsonl") are not data
        suits = tuple(e + c for e in exts for c in ("", *COMPRESSED))
        files = [str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                 and f.name.lower().endswith(suits)]
    else:
        files = [f for f in glob.glob(pattern, recursive=True) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"no input files match {pattern!r} (format {fmt!r} reads "
                                f"{'/'.join(exts)} files, optionally .gz/.zst)")
    return sorted(files)


# ---- containers: each yields (index, record or RecordError, raw line bytes or None) ----

def _decompress(path: str, data: bytes) -> bytes:
    """By suffix; a corrupt or truncated stream raises ValueError naming the codec."""
    name = path.lower()
    if name.endswith(".gz"):
        try:
            return gzip.decompress(data)  # multi-member aware; truncation raises EOFError
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"gzip: {e}") from e
    if name.endswith(".zst"):
        import zstandard

        # Streaming, frame by frame: handles frames without a content size, and .eof tells
        # a complete frame from a truncated one (stream_reader returns partial data silently).
        chunks, rest = [], data
        while rest:
            dobj = zstandard.ZstdDecompressor().decompressobj()
            try:
                chunks.append(dobj.decompress(rest))
            except zstandard.ZstdError as e:
                raise ValueError(f"zstd: {e}") from e
            if not dobj.eof:
                raise ValueError("zstd: the stream ends inside a frame (truncated file)")
            rest = dobj.unused_data
        return b"".join(chunks)
    return data


def _loads(data: bytes) -> Any:
    """Fast path orjson; on any failure the stdlib decides, so error messages (and the odd
    input orjson rejects but json accepts, e.g. NaN) are the standard parser's."""
    if _fast_loads is not None:
        try:
            return _fast_loads(data)
        except ValueError:
            pass
    try:
        text = data.decode("utf-8")  # strict: invalid bytes are an error, never replaced
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}: {e.reason}") from e
    try:
        obj = json.loads(text)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # escaped lone surrogates
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise RecordError(f"invalid JSON: {e.msg} at {at}") from e
    except UnicodeEncodeError as e:
        raise RecordError("invalid JSON: an escaped lone surrogate is not text") from e
    except (ValueError, RecursionError) as e:  # e.g. an integer over 4300 digits, deep nesting
        raise RecordError(f"invalid JSON: {e}") from e
    return obj


def _jsonl_records(data: bytes) -> Iterator[tuple[int, Any, bytes | None]]:
    # Some "JSON" corpora of line-record schemas are one array (Stanford's alpaca_data.json,
    # MOSS-002's *.json): read them as such when the whole file parses as an array.
    if data.lstrip()[:1] == b"[":
        try:
            items = _loads(data)
        except RecordError:
            items = None  # not an array after all: report it line by line
        if isinstance(items, list):
            yield from ((n, item, None) for n, item in enumerate(items, start=1))
            return
    # Split on b"\n" only: str.splitlines would also break on U+2028 etc. inside strings.
    for n, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue  # blank lines are not records
        try:
            yield n, _loads(line), line
        except RecordError as e:
            yield n, e, line


def _json_records(data: bytes) -> Iterator[tuple[int, Any, bytes | None]]:
    try:
        items = _loads(data)
    except RecordError as e:
        raise ValueError(f"not a valid JSON array file: {e}") from e
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON array of objects, got {type(items).__name__}")
    for n, item in enumerate(items, start=1):
        yield n, item, None


def _parquet_records(data: bytes) -> Iterator[tuple[int, Any, bytes | None]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            n += 1
            yield n, rec, None


CONTAINERS = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records}


def _row(src: SourceConfig, path: str, line: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS, "")
    row.update(source=src.name, path=path, line=line, status=KEPT)
    row.update(fields)
    return row


def _raw_text(rec: Any, raw: bytes | None) -> str:
    """The offending record as the report shows it: its line, else its JSON rendering."""
    text = (raw.decode("utf-8", errors="replace") if raw is not None
            else json.dumps(rec, ensure_ascii=False, default=str))
    return text[:RAW_LIMIT]


def _convert(fmt: Format, rec: Any, src: SourceConfig) -> list[Converted]:
    """A record's rows as canonical dicts (messages JSON-encoded); a bad record is one
    ``{"error": reason}``."""
    try:
        if isinstance(rec, RecordError):  # the container could not parse it
            raise rec
        if not isinstance(rec, dict):
            raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
        out = fmt.convert(rec, src)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        # Non-RecordErrors come from nested values of an unexpected shape: name the type.
        return [{"error": str(e) if isinstance(e, RecordError) else f"{type(e).__name__}: {e}"}]
    return [{**o, "messages": json.dumps(o["messages"], ensure_ascii=False)}
            if "messages" in o else o for o in (out if isinstance(out, list) else [out])]


def parse_file(path: str, data: bytes, src: SourceConfig) -> list[dict[str, Any]]:
    """One input file -> its rows (see the module docstring). Pure: no Ray, no I/O.

    A malformed record becomes a quarantined row and the file goes on; a file that cannot
    be decoded at all (corrupt compression, not a JSON array, unreadable parquet) becomes
    one quarantined row with line 0. Rows can outnumber records (``wanjuan_exam``, both).
    """
    fmt = get_format(src.format)
    unit = "row" if fmt.container == "parquet" else "element"  # when there are no lines
    rows: list[dict[str, Any]] = []
    try:
        data = _decompress(path, data).removeprefix(b"\xef\xbb\xbf")  # BOM: not content
        for n, rec, raw in CONTAINERS[fmt.container](data):
            where = f"line {n}" if raw is not None else f"{unit} {n}"
            for out in _convert(fmt, rec, src):
                if "error" in out:
                    out = {"status": QUARANTINED, "reason": f"{where}: {out['error']}",
                           "raw": _raw_text(rec, raw), "task_type": out.get("task_type", "")}
                rows.append(_row(src, path, n, **out))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        # The file itself cannot be decoded. Rows already produced stay (a parquet file
        # that breaks mid-way); the failure is one more row, with line 0.
        rows.append(_row(src, path, 0, status=QUARANTINED, reason=f"cannot read file: {e}"))
    return rows


def read_source(src: SourceConfig) -> Any:
    """-> ``ray.data.Dataset`` of the rows of every file of ``src``, parsed in parallel.

    Files are read by ``parse_file`` in the tasks, not by ``ray.data.read_binary_files``:
    that one decompresses .gz/.zst itself (Arrow infers the codec from the extension, and
    ``compression=None`` means "infer"), so a corrupt archive would fail the whole job
    instead of becoming one quarantined row.
    """
    import ray

    # Rows report the path as configured; tasks open it resolved by the driver, since a
    # worker's working directory need not be the driver's.
    items = [{"path": f, "file": str(Path(f).resolve())} for f in
             expand_paths(src.path, src.format)]
    # One block per file, so files are parsed in parallel.
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(
        _parse_item, fn_kwargs={"src": src})


def _parse_item(item: dict[str, Any], src: SourceConfig) -> list[dict[str, Any]]:
    return parse_file(item["path"], Path(item["file"]).read_bytes(), src)
