"""Reading input files: every file of a source, in bounded streaming tasks, into uniform rows.

``SourceConfig.format`` names an entry of ``formats.FORMATS`` (the schemas). Every reader
turns one input file into one row per record, kept or quarantined, with exactly the columns of
``ROW_COLUMNS``, so the datasets of all sources can be unioned and counted:

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
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from steelworks.core.storage import Remote, is_uri
from steelworks.data.config import SourceConfig
from steelworks.data.formats import Converted, Format, RecordError, expand_paths, get_format

try:  # orjson parses JSON lines ~3x faster; optional, the stdlib gives the same results
    import orjson

    _fast_loads: Callable[[bytes], Any] | None = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None

KEPT, QUARANTINED = "kept", "quarantined"
ROW_COLUMNS = ("source", "path", "line", "status", "reason", "raw", "text", "messages",
               "task_type", "lang")
RAW_LIMIT = 2000  # chars of a quarantined record kept for the report


# ---- streams: a file (or bytes) as decompressed chunks, then records -----------------------
#
# Everything below reads incrementally: memory per task is a read buffer plus the longest
# record, whatever the file's size. A decompression error raises ValueError naming the codec;
# the rows read before it stay, and the reader adds one quarantined line-0 row for the rest.

CHUNK = 1 << 20  # bytes read (or decompressed) at a time


def _codec(path: str) -> str:
    name = path.lower()
    return "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else ""


def _chunks(f: BinaryIO, codec: str) -> Iterator[bytes]:
    """Decompressed chunks of ``f``. gzip is multi-member aware; zstd is decoded frame by
    frame (frames without a content size, concatenated frames) and ``.eof`` tells a complete
    frame from a truncated one, which zstandard's stream_reader would return silently."""
    if codec == "gz":
        with gzip.GzipFile(fileobj=f) as g:
            try:
                while chunk := g.read(CHUNK):
                    yield chunk
            except (OSError, EOFError, zlib.error) as e:
                raise ValueError(f"gzip: {e}") from e
        return
    if codec == "zst":
        import zstandard

        dobj, in_frame = zstandard.ZstdDecompressor().decompressobj(), False
        while data := f.read(CHUNK):
            while data:
                try:
                    out = dobj.decompress(data)
                except zstandard.ZstdError as e:
                    raise ValueError(f"zstd: {e}") from e
                if out:
                    yield out
                if dobj.eof:  # a frame ended; what follows it starts the next one
                    data, in_frame = dobj.unused_data, False
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                else:
                    data, in_frame = b"", True
        if in_frame:
            raise ValueError("zstd: the stream ends inside a frame (truncated file)")
        return
    while chunk := f.read(CHUNK):
        yield chunk


class _ChunkReader(io.RawIOBase):
    """A readable binary file over an iterator of chunks (for readline, ijson, copies)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _stream(f: BinaryIO, codec: str) -> io.BufferedReader:
    return io.BufferedReader(_ChunkReader(_chunks(f, codec)), CHUNK)


# ---- records: each yields (index, record or RecordError, raw line bytes or None) ----

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


def _line_records(lines: Iterator[bytes], first: int) -> Iterator[tuple[int, Any, bytes | None]]:
    """JSON lines, numbered from ``first``. Split on b"\n" only (str.splitlines would also
    break on U+2028 etc. inside strings); blank lines are not records."""
    for n, line in enumerate(lines, start=first):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            yield n, _loads(line), line
        except RecordError as e:
            yield n, e, line


_TOP_TYPES = {b"{": "dict", b'"': "str", b"t": "bool", b"f": "bool", b"n": "NoneType"}


def _array_records(f: BinaryIO) -> Iterator[tuple[int, Any, bytes | None]]:
    """The elements of one top-level JSON array, parsed incrementally (ijson's C backend):
    a 2 GB Wikipedia dump is read element by element, never held whole."""
    import ijson

    head = f.peek(64)[:64].lstrip() if hasattr(f, "peek") else b""
    if head[:1] and head[:1] != b"[":
        kind = _TOP_TYPES.get(head[:1], "number" if head[:1] in b"-0123456789" else "")
        raise ValueError(f"expected a JSON array of objects, got {kind or 'something else'}")
    n = 0
    try:
        for n, item in enumerate(ijson.items(f, "item", use_float=True), start=1):
            try:  # ijson passes escaped lone surrogates through; they are not text
                json.dumps(item, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                item = RecordError("invalid JSON: an escaped lone surrogate is not text")
            yield n, item, None
    except ijson.JSONError as e:
        raise ValueError(f"not a valid JSON array file: {e} (after element {n})") from e


def _parquet_records(f: BinaryIO, row_groups: list[int] | None = None, first: int = 1
                     ) -> Iterator[tuple[int, Any, bytes | None]]:
    import pyarrow.parquet as pq

    n = first - 1
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, row_groups=row_groups):
        for rec in batch.to_pylist():
            n += 1
            yield n, rec, None


def _lines_in_range(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The lines of an uncompressed file that begin in bytes [start, end): the line that
    straddles ``start`` belongs to the previous range, the one that straddles ``end`` to
    this one, so the ranges of a file read every line exactly once."""
    pos = start
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":  # mid-line: that line is the previous range's
            pos += len(f.readline())
    while pos < end:
        line = f.readline()
        if not line:
            return
        pos += len(line)
        yield line


def _jsonl_stream(f: io.BufferedReader) -> Iterator[tuple[int, Any, bytes | None]]:
    """A whole JSON-lines stream. Some "JSON" corpora of line-record schemas are one array
    (Stanford's alpaca_data.json, MOSS-002's *.json): a stream whose first line opens an
    array it does not close (``[`` alone, pretty-printed), or whose only line is an array,
    is read as that array's elements."""
    first = f.readline()
    if first.strip()[:1] == b"[":
        try:
            whole = _loads(first.strip())
        except RecordError:  # a multi-line array: stream it
            rest = itertools.chain([first], iter(lambda: f.read(CHUNK), b""))
            yield from _array_records(io.BufferedReader(_ChunkReader(rest), CHUNK))
            return
        rest = f.readline()
        while rest and not rest.strip():
            rest = f.readline()
        if not rest and isinstance(whole, list):  # one line holding the whole array
            yield from ((n, item, None) for n, item in enumerate(whole, start=1))
            return
        yield from _line_records(itertools.chain([first], [rest] if rest else [], f), 1)
        return
    yield from _line_records(itertools.chain([first], f), 1)


def _strip_bom(f: io.BufferedReader) -> io.BufferedReader:
    if f.peek(3)[:3] == b"\xef\xbb\xbf":  # a BOM: not content
        f.read(3)
    return f


# ---- read tasks: the unit of parallelism -------------------------------------------------

@dataclass(frozen=True)
class ReadTask:
    """Part of one input file, read by one Ray task.

    ``lines``: the JSON lines beginning in bytes [start, end) of an uncompressed file, the
    first numbered ``newlines_before + 1`` or ``+ 2`` (see ``_read_lines``). ``parquet``: row
    groups [start, end), rows numbered from ``first_row``. ``whole``: the whole file as one
    stream (compressed files, JSON arrays: neither can be cut at a byte offset).
    """

    path: str  # as configured: what rows and the quarantine report
    file: str  # resolved: what the task opens (a worker's cwd need not be the driver's)
    mode: Literal["lines", "parquet", "whole"] = "whole"
    start: int = 0
    end: int = -1
    newlines_before: int = 0
    first_row: int = 1

    @property
    def key(self) -> str:
        return f"{self.path}@{self.start}"


@dataclass
class ReadCounts:
    """What a reader saw, counted where it reads, independent of the rows downstream:
    ``records`` input records (non-blank lines, array elements, parquet rows; a file or
    remainder that could not be decoded counts as one), ``rows`` rows emitted (more than
    records when one record gives several rows, ``wanjuan_exam`` both)."""

    records: int = 0
    rows: int = 0


def _task_records(task: ReadTask, fmt: Format, f: BinaryIO
                  ) -> Iterator[tuple[int, Any, bytes | None]]:
    if task.mode == "lines":
        first = task.newlines_before + 1
        if task.start > 0:  # the first line read is the one after the next newline, unless
            f.seek(task.start - 1)  # the range starts right after one
            first += f.read(1) != b"\n"
        lines = _lines_in_range(f, task.start, task.end)
        if task.start == 0:
            lines = _skip_bom(lines)
        return _line_records(lines, first)
    if task.mode == "parquet":
        return _parquet_records(f, list(range(task.start, task.end)), task.first_row)
    if fmt.container == "parquet":  # Arrow needs a seekable file: spool a compressed one
        return _parquet_spooled(_stream(f, _codec(task.path))) if _codec(task.path) \
            else _parquet_records(f)
    stream = _strip_bom(_stream(f, _codec(task.path)))
    return _jsonl_stream(stream) if fmt.container == "jsonl" else _array_records(stream)


def _skip_bom(lines: Iterator[bytes]) -> Iterator[bytes]:
    for i, line in enumerate(lines):
        yield line.removeprefix(b"\xef\xbb\xbf") if i == 0 else line


def _parquet_spooled(stream: BinaryIO) -> Iterator[tuple[int, Any, bytes | None]]:
    import shutil
    import tempfile

    with tempfile.TemporaryFile() as tmp:  # on disk: memory stays bounded
        shutil.copyfileobj(stream, tmp, CHUNK)
        tmp.seek(0)
        yield from _parquet_records(tmp)


def read_task(task: ReadTask, src: SourceConfig, f: BinaryIO | None = None,
              counts: ReadCounts | None = None, batch_rows: int = 2048
              ) -> Iterator[list[dict[str, Any]]]:
    """The rows of one task (see the module docstring), in lists of at most about
    ``batch_rows``. Reads ``task.file`` unless ``f`` is given. A malformed record becomes a
    quarantined row and the task goes on; a file (or the rest of one) that cannot be decoded
    becomes one quarantined row with line 0, after the rows read before it."""
    fmt = get_format(src.format)
    unit = "row" if fmt.container == "parquet" else "element"  # when there are no lines
    counts = counts if counts is not None else ReadCounts()
    batch: list[dict[str, Any]] = []
    own = f is None
    try:
        if own:
            f = open(task.file, "rb")  # noqa: SIM115 - closed in finally
        for n, rec, raw in _task_records(task, fmt, f):
            counts.records += 1
            where = f"line {n}" if raw is not None else f"{unit} {n}"
            for out in _convert(fmt, rec, src):
                if "error" in out:
                    out = {"status": QUARANTINED, "reason": f"{where}: {out['error']}",
                           "raw": _raw_text(rec, raw), "task_type": out.get("task_type", "")}
                batch.append(_row(src, task.path, n, **out))
            if len(batch) >= batch_rows:
                counts.rows += len(batch)
                yield batch
                batch = []
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        counts.records += 1
        batch.append(_row(src, task.path, 0, status=QUARANTINED, reason=f"cannot read file: {e}"))
    finally:
        if own and f is not None:
            f.close()
    counts.rows += len(batch)
    if batch:
        yield batch


def parse_file(path: str, data: bytes, src: SourceConfig) -> list[dict[str, Any]]:
    """One whole input file given as bytes -> its rows. Pure: no Ray, no I/O; what the tests
    of the formats call. ``read_source`` reads files the same way, in bounded pieces."""
    task = ReadTask(path, path)
    return [row for batch in read_task(task, src, io.BytesIO(data)) for row in batch]


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


# ---- planning: files -> tasks ------------------------------------------------------------

def _count_newlines(file: str, start: int, end: int) -> int:
    n = 0
    with open(file, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(CHUNK * 8, left))):
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _is_array_file(file: str) -> bool:
    """Whether an uncompressed JSON-lines file opens with an array (read whole, see
    ``_jsonl_stream``): such a file cannot be cut at a newline."""
    with open(file, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == b"["


def plan_tasks(src: SourceConfig, block_bytes: int,
               count_newlines: Callable[[list[tuple[str, int, int]]], list[int]] | None = None
               ) -> list[ReadTask]:
    """Every file of ``src`` cut into tasks of about ``block_bytes`` of input: uncompressed
    JSON lines at newlines, parquet at row-group boundaries; compressed files and JSON arrays
    are one streaming task each (a .zst or .gz stream cannot be entered mid-way).

    A line-range task numbers its lines from the newlines before its range, which
    ``count_newlines`` (a list of (file, start, end) ranges -> counts; Ray tasks in
    ``read_source``, in-process by default) counts in one extra pass over a split file's
    bytes: at GB/s against the parse's MB/s, a small price for exact line numbers in the
    quarantine report.
    """
    fmt = get_format(src.format)
    count = count_newlines or (lambda ranges: [_count_newlines(*r) for r in ranges])
    plan: list[tuple[str, str, int, bool]] = []  # (path, file, size, cut at newlines)
    for path in expand_paths(src.path, src.format):
        file = str(Path(path).resolve())
        size = Path(file).stat().st_size
        cut = (fmt.container == "jsonl" and not _codec(path) and size > block_bytes
               and not _is_array_file(file))
        plan.append((path, file, size, cut))
    ranges = [(file, s, min(s + block_bytes, size)) for _, file, size, cut in plan if cut
              for s in range(0, size, block_bytes)]
    newlines = iter(count(ranges))
    tasks: list[ReadTask] = []  # in file order, then offset order: rows come out in order
    for path, file, size, cut in plan:
        if cut:
            before = 0
            for s in range(0, size, block_bytes):
                tasks.append(ReadTask(path, file, "lines", s, min(s + block_bytes, size), before))
                before += next(newlines)
        elif fmt.container == "parquet" and not _codec(path) and size > block_bytes:
            tasks += _parquet_tasks(path, file, block_bytes)
        else:
            tasks.append(ReadTask(path, file))
    return tasks


def _parquet_tasks(path: str, file: str, block_bytes: int) -> list[ReadTask]:
    """Consecutive row groups of about ``block_bytes`` (compressed) each; a file Arrow
    cannot open is one task, which quarantines it."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(file).metadata
    except (OSError, ValueError):
        return [ReadTask(path, file)]
    tasks, start, first, size, rows = [], 0, 1, 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size += rg.total_compressed_size if hasattr(rg, "total_compressed_size") else rg.total_byte_size
        rows += rg.num_rows
        if size >= block_bytes or g == meta.num_row_groups - 1:
            tasks.append(ReadTask(path, file, "parquet", start, g + 1, first_row=first))
            start, first, size = g + 1, first + rows, 0
            rows = 0
    return tasks or [ReadTask(path, file)]


# ---- Ray -----------------------------------------------------------------------------

def read_source(src: SourceConfig, block_bytes: int = 64 << 20, counts_dir: str | None = None
                ) -> Any:
    """-> ``ray.data.Dataset`` of the rows of every file of ``src``, read by parallel tasks of
    about ``block_bytes`` of input each (``plan_tasks``). Each task streams: it yields rows
    in batches as it reads, so Ray Data passes them on while it is still reading.

    With ``counts_dir``, each task writes its ``ReadCounts`` there when it finishes (one file
    per task, overwritten by a retry), for ``read_counts`` to sum: the accounting check's
    ``read`` comes from the readers, not from the rows.

    Files are opened by the tasks, not by ``ray.data.read_binary_files``: that one
    decompresses .gz/.zst itself (Arrow infers the codec from the extension), so a corrupt
    archive would fail the whole job instead of becoming one quarantined row.
    """
    import ray

    @ray.remote(num_cpus=1)
    def newlines(file: str, start: int, end: int) -> int:
        return _count_newlines(file, start, end)

    tasks = plan_tasks(src, block_bytes,
                       lambda ranges: ray.get([newlines.remote(*r) for r in ranges]))
    items = [{"task": json.dumps(t.__dict__)} for t in tasks]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_batch, batch_size=1, batch_format="pandas",
        fn_kwargs={"src": src, "counts_dir": counts_dir})


def _read_batch(batch: Any, src: SourceConfig, counts_dir: str | None) -> Iterator[Any]:
    import pandas as pd

    for spec in batch["task"]:
        task, counts = ReadTask(**json.loads(spec)), ReadCounts()
        for rows in read_task(task, src, counts=counts):
            yield pd.DataFrame(rows, columns=list(ROW_COLUMNS))
        if counts_dir is not None:
            _write_counts(counts_dir, src.name, task, counts)


def _write_counts(directory: Path, source: str, task: ReadTask, counts: ReadCounts) -> None:
    """One task's counts, atomically: to a file, or to an object when ``directory`` is a URI
    (the run is in a bucket and this task may run on another node than the driver)."""
    import hashlib
    import os

    name = hashlib.sha1(f"{source}\0{task.key}".encode()).hexdigest()[:20] + ".json"
    record = {"source": source, "task": task.key, **counts.__dict__}
    if is_uri(str(directory)):
        Remote(str(directory)).write_json(name, record)  # one PUT: atomic
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / name)


def read_counts(counts_dir: str | Path) -> dict[str, ReadCounts]:
    """{source: ReadCounts} summed over the files ``read_source`` tasks wrote (a directory,
    or a URI: ``_write_counts``)."""
    out: dict[str, ReadCounts] = {}
    if is_uri(str(counts_dir)):
        remote = Remote(str(counts_dir))
        records = [remote.read_json(rel) for rel in sorted(remote.listing()) if rel.endswith(".json")]
    else:
        records = [json.loads(f.read_text()) for f in sorted(Path(counts_dir).glob("*.json"))]
    for c in records:
        total = out.setdefault(c["source"], ReadCounts())
        total.records += c["records"]
        total.rows += c["rows"]
    return out
