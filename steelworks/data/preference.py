"""Preference records (DPO data) in one normal form, whatever layout the source uses.

Public preference sets come in three layouts; ``normalize_preference`` accepts all of them
and returns ``{"prompt_messages": [...], "chosen": [...], "rejected": [...]}``, where the
prompt is a chat conversation ending in a user turn and each completion is a list of
assistant messages (usually one). Downstream code then renders ``prompt + chosen`` and
``prompt + rejected`` through the chat template exactly as SFT renders a conversation
(``sft.encode_conversation``), so a DPO sample and an SFT sample of the same text tokenize
the same way.

1. ``{"prompt": str, "chosen": str, "rejected": str}`` (Anthropic-HH-like, TRL "standard").
2. ``{"messages": [...prompt turns...], "chosen": str | message | [messages], "rejected": ...}``.
3. UltraFeedback-binarized: ``{"prompt": str, "chosen": [full conversation],
   "rejected": [full conversation]}``; both conversations share every turn but the last,
   which is the assistant answer being compared. (That dataset also carries ``messages``,
   a copy of the chosen conversation; it is ignored in this layout.)

Bad records raise ``PreferenceError`` naming ``where`` (e.g. ``"prefs.jsonl:12"``), because
a silent skip would quietly bias the preference set and a bare error would not say which
of a million lines to look at. Message shape checks are ``sft.validate_messages``'s, so
SFT and DPO agree on what a valid conversation is.

``encode_answer``/``encode_pair`` tokenize a normalised pair (token ids and an answer mask per
side) and ``read_preferences`` reads whole JSONL files, quarantining each bad line with its
location and reason; the dpo stage (platform/pipeline.py) stores the result with the
reference log-probs (train/reference.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from steelworks.data.sft import ConversationError, assistant_spans, validate_messages

Message = dict[str, str]


class PreferenceError(ValueError):
    """A preference record that cannot be normalised; the message starts with its location."""


def _is_conversation(value: Any) -> bool:
    """A list holding a user or system turn: a whole conversation (layout 3), not answers.
    (Any other stray role is left to ``_completion`` to report as a wrong role.)"""
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") in ("user", "system")
                                           for m in value)


def _completion(value: Any, name: str, where: str) -> list[Message]:
    """``str`` | message | list of messages -> a non-empty list of assistant messages."""
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        messages = [value]
    elif isinstance(value, list) and value:
        messages = value
    else:
        raise PreferenceError(f"{where}: {name!r} must be a string, a message or a non-empty list of "
                              f"messages, got {type(value).__name__}{' (empty)' if value == [] else ''}")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role != "assistant":
            raise PreferenceError(f"{where}: {name!r} message {i} must have role 'assistant', "
                                  f"got {role!r}")
    return messages


def _split_conversations(record: dict[str, Any], where: str
                         ) -> tuple[list[Message], list[Message], list[Message]]:
    """Layout 3: the shared prefix is the prompt; the differing last turns are the answers."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(chosen, list) or not isinstance(rejected, list) \
            or len(chosen) < 2 or len(rejected) < 2:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' must both be conversations "
                              "(a prompt followed by an assistant answer)")
    if chosen[:-1] != rejected[:-1]:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' conversations differ before their "
                              "last turn; only the final assistant answer may differ")
    prompt_messages = chosen[:-1]
    prompt = record.get("prompt")
    if prompt is not None:
        last = prompt_messages[-1] if isinstance(prompt_messages[-1], dict) else {}
        if not isinstance(prompt, str) or str(last.get("content", "")).strip() != prompt.strip():
            raise PreferenceError(f"{where}: 'prompt' does not match the conversation's last "
                                  "turn before the answers")
    return (prompt_messages, _completion(chosen[-1:], "chosen", where),
            _completion(rejected[-1:], "rejected", where))


def _prompt_messages(record: dict[str, Any], where: str) -> list[Message]:
    """Layouts 1 and 2: the prompt is ``messages`` (a conversation) or ``prompt`` (one user turn)."""
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise PreferenceError(f"{where}: 'messages' must be a non-empty list of prompt turns")
        return record["messages"]
    if not isinstance(record["prompt"], str):
        raise PreferenceError(f"{where}: 'prompt' must be a string (or pass 'chosen'/'rejected' "
                              f"as full conversations), got {type(record['prompt']).__name__}")
    return [{"role": "user", "content": record["prompt"]}]


def _check(prompt_messages: list[Message], chosen: list[Message], rejected: list[Message],
           where: str) -> None:
    """Shape (via SFT's validator), non-empty text, prompt ends on a user turn, answers differ."""
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        try:
            validate_messages(prompt_messages + answer)
        except ConversationError as e:
            # Indices count the prompt turns first, then the answer's.
            raise PreferenceError(f"{where}: prompt + {name}: {e}") from e
    if prompt_messages[-1]["role"] != "user":
        raise PreferenceError(f"{where}: the prompt must end with a user turn, not "
                              f"{prompt_messages[-1]['role']!r}")
    for part, messages in (("prompt", prompt_messages), ("chosen", chosen), ("rejected", rejected)):
        for i, m in enumerate(messages):
            if not m["content"].strip() and m["role"] != "system":
                raise PreferenceError(f"{where}: {part} message {i} ({m['role']}) is empty")
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise PreferenceError(f"{where}: 'chosen' and 'rejected' are identical; the pair "
                              "carries no preference")


def normalize_preference(record: Any, where: str) -> dict[str, list[Message]]:
    """One preference record -> ``{"prompt_messages", "chosen", "rejected"}`` (see module doc).

    Keys other than those of the layout (ids, scores, sources) are ignored. Raises
    ``PreferenceError`` naming ``where`` and what is wrong for any other layout, empty text,
    identical answers, or a role in the wrong place.
    """
    if not isinstance(record, dict):
        raise PreferenceError(f"{where}: a preference record must be an object, "
                              f"got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing or not ("prompt" in record or "messages" in record):
        raise PreferenceError(
            f"{where}: unrecognised preference layout with keys {sorted(record)}; expected "
            "{prompt, chosen, rejected} (strings, or full conversations) or "
            "{messages, chosen, rejected}")
    if _is_conversation(record["chosen"]) or _is_conversation(record["rejected"]):
        prompt_messages, chosen, rejected = _split_conversations(record, where)
    else:
        prompt_messages = _prompt_messages(record, where)
        chosen = _completion(record["chosen"], "chosen", where)
        rejected = _completion(record["rejected"], "rejected", where)
    _check(prompt_messages, chosen, rejected, where)
    # Copies, so that callers mutating the result never alter the source record.
    return {"prompt_messages": [dict(m) for m in prompt_messages],
            "chosen": [dict(m) for m in chosen], "rejected": [dict(m) for m in rejected]}


def encode_answer(tok, prompt_messages: list[Message], answer: list[Message], max_length: int
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """``prompt + answer`` through the chat template -> (token ids, loss mask, truncated?).

    The mask covers the answer's assistant turns (content and end-of-turn token, the rule of
    ``sft.assistant_spans``) and nothing of the prompt, not even its earlier assistant turns:
    DPO compares the two answers, and the shared prompt would only add the same terms to both
    sides. A sequence longer than ``max_length`` is cut at the end (the answer's tail); a
    prompt that leaves no answer token raises ``PreferenceError``."""
    messages = prompt_messages + answer
    text, spans = assistant_spans(tok, messages)
    prompt_chars = len(tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True))
    spans = [(s, e) for s, e in spans if s >= prompt_chars]
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets]
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        prompt_tokens = sum(1 for a, _ in offsets if a < prompt_chars)
        raise PreferenceError(f"the prompt is {prompt_tokens} tokens and leaves no room for the "
                              f"answer within dpo.max_length={max_length}")
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), truncated


def encode_pair(tok, pair: dict[str, list[Message]], max_length: int, where: str) -> dict[str, Any]:
    """A normalised pair (``normalize_preference``) -> its two tokenized sequences:
    ``{chosen_ids, chosen_mask, rejected_ids, rejected_mask, truncated}``. Errors name ``where``."""
    out: dict[str, Any] = {"truncated": False}
    for name in ("chosen", "rejected"):
        try:
            ids, mask, cut = encode_answer(tok, pair["prompt_messages"], pair[name], max_length)
        except PreferenceError as e:
            raise PreferenceError(f"{where}: {e}") from e
        out[f"{name}_ids"], out[f"{name}_mask"] = ids, mask
        out["truncated"] |= cut
    return out


def read_preferences(paths: list[str | Path], tok, max_length: int
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Read, normalise and tokenize every pair of the JSONL ``paths`` ->
    (pairs, quarantined records, counts).

    A line that is not JSON or not a valid pair is quarantined with its location and reason
    (``{"where": "file:line", "error", "line"}``) and counted, never dropped silently; every
    pair gets a ``pair_id`` (its position among the good ones) and its ``source`` location."""
    pairs: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    counts = {"read": 0, "pairs": 0, "quarantined": 0, "truncated": 0}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dpo.data: {path} does not exist (a preference JSONL file)")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                counts["read"] += 1
                where = f"{path}:{lineno}"
                try:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PreferenceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
                    encoded = encode_pair(tok, normalize_preference(record, where), max_length, where)
                except PreferenceError as e:
                    quarantined.append({"where": where, "error": str(e), "line": line.rstrip("\n")})
                    counts["quarantined"] += 1
                    continue
                counts["truncated"] += int(encoded.pop("truncated"))
                pairs.append({"pair_id": len(pairs), "source": where, **encoded})
    counts["pairs"] = len(pairs)
    return pairs, quarantined, counts
