"""Input formats: a registry of real corpus schemas, each mapping one raw record to canonical
fields (``readers.py`` reads the files and turns these into rows).

``SourceConfig.format`` names an entry of ``FORMATS``. A format's ``convert`` maps a record
(a dict from JSON or parquet) to ``{"text"}`` or ``{"messages", "task_type", "lang"}``, or
raises ``RecordError`` saying which field is wrong. A ``wanjuan_exam`` record yields one
result per style (``exam_style: both``: answer-first and cot). The generic formats (``jsonl``,
``json``, ``parquet``) map columns, or templates of columns, by ``SourceConfig.columns``.
Route sources with ``source_kind(src)``: a generic format is SFT when it maps ``messages`` or
``prompt``/``response``.
"""

from __future__ import annotations

import glob
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from steelworks.data.config import SourceConfig

Kind = Literal["text", "sft"]
Container = Literal["jsonl", "json", "parquet"]
Converted = dict[str, Any]
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

def _field(rec: dict[str, Any], spec: str, role: str) -> str:
    """``spec`` is a column name, or a template of columns (``"{INSTRUCTION}\n{RESPONSE}"``,
    str.format syntax) joined into one string; ``role`` names the mapping in errors."""
    if "{" not in spec:
        return _str(rec, spec)
    values = {}
    for _, name, _, _ in string.Formatter().parse(spec):
        if name is None:
            continue
        value = rec.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise RecordError(f"field '{name}' (in the {role} template) missing or not a string")
        values[name] = value
    return spec.format_map(values)


def _generic(rec: dict[str, Any], src: SourceConfig) -> Converted:
    """Custom data: ``columns`` maps canonical fields to the source's columns or templates.
    Text: ``text`` (default column "text"). SFT: ``messages`` (an OpenAI-style list, or its
    JSON encoding), or ``prompt`` + ``response`` (+ optional ``system``) as one exchange."""
    cols = src.columns
    if "prompt" in cols:
        system = _field(rec, cols["system"], "system") if "system" in cols and (
            "{" in cols["system"] or rec.get(cols["system"]) is not None) else ""
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": _field(rec, cols["prompt"], "prompt")},
            {"role": "assistant", "content": _field(rec, cols["response"], "response")}]
        tag = _str(rec, cols["task_type"]) if "task_type" in cols else "chat"
        out: Converted = _sft(messages, tag, src)
    elif "messages" in cols:
        messages = rec.get(cols["messages"])
        if isinstance(messages, str):  # a JSON-encoded list (common in parquet exports)
            try:
                messages = json.loads(messages)
            except ValueError as e:
                raise RecordError(f"field '{cols['messages']}' is not a JSON list: {e}") from e
        tag = _str(rec, cols["task_type"]) if "task_type" in cols else "chat"
        out = _sft(messages, tag, src)
    else:
        out = {"text": _field(rec, cols.get("text", "text"), "text")}
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
    if src.format in GENERIC and ("messages" in src.columns or "prompt" in src.columns):
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
